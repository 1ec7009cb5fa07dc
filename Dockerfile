# The app image: serves one store file read-only. No torch, no pipeline, no build tools: every
# requirement installs from a wheel (--only-binary), so the slim base needs no compiler.
#   docker build -t dpo-neurons-app .
#   docker run --rm -p 8501:8501 -v "$PWD/share.duckdb:/data/store.duckdb:ro" dpo-neurons-app
# The store is mounted, never baked in: /data is a volume, mounted read-only (:ro) as above.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STORE=/data/store.duckdb

WORKDIR /srv
COPY requirements.txt .
RUN pip install --no-cache-dir --only-binary=:all: -r requirements.txt

COPY store/ store/
COPY app/ app/

RUN useradd --no-log-init --create-home --uid 10001 --shell /usr/sbin/nologin viewer
USER 10001

VOLUME ["/data"]
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["streamlit", "run", "app/Home.py", "--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true", "--browser.gatherUsageStats=false"]
