# The app image: serves a store file read-only. No torch, no pipeline, no build tools.
#   docker build -t dpo-neurons-app .
#   docker run -p 8501:8501 -v "$PWD/store:/data:ro" dpo-neurons-app
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STORE=/data/dpo_neurons.duckdb

WORKDIR /srv
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY store/__init__.py store/schema.sql store/
COPY app/ app/

RUN useradd --create-home --uid 10001 viewer
USER viewer

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=4)"
CMD ["streamlit", "run", "app/Home.py", "--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true"]
