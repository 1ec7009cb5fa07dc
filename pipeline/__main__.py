"""Command line: `python -m pipeline run|status --config FILE [--set SECTION.KEY=VALUE]`, `export --run ID --out FILE`."""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path

import store
from pipeline import config


def _parser() -> argparse.ArgumentParser:
    epilog = "Config keys (TOML sections and keys; unknown keys are refused):\n\n" + config.help_table()
    p = argparse.ArgumentParser(prog="python -m pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train, record and analyse a base model and its DPO copy into the DuckDB store.",
                                epilog=epilog)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stages (cached ones are skipped) and write a run into the store",
                       description="Run the pipeline's stages in order and write one run into the store. A stage "
                                   "whose config and inputs are unchanged is taken from the cache.")
    r.add_argument("--config", required=True, help="TOML config file, e.g. configs/demo.toml")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE and every stage after it that depends on it (repeatable)")
    r.add_argument("--only", metavar="STAGE", help="run only STAGE (its inputs must be cached); no store write")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key, the value in TOML syntax (repeatable), e.g. --set data.max_prompts=64")
    s = sub.add_parser("status", help="show each stage's cache key and whether it is cached",
                       description="Show, for each stage of a config, its cache key, whether it is cached, its time and summary.")
    s.add_argument("--config", required=True, help="TOML config file")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key, as for run")
    e = sub.add_parser("export", help="copy one run into a compact store file (or Parquet files) to share",
                       description="Copy one run out of the store: --out writes a single-run store file that the app "
                                   "and any DuckDB client open; --parquet writes one Parquet file per table.")
    e.add_argument("--run", required=True, metavar="ID", help="run_id to export (the app's sidebar shows it)")
    e.add_argument("--store", default=config.RunConfig.store, help="source store file (default: %(default)s)")
    dest = e.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE", help="single-run store file to write, e.g. share.duckdb")
    dest.add_argument("--parquet", metavar="DIR", help="folder to write <table>.parquet files into")
    e.add_argument("--force", action="store_true", help="replace FILE or DIR if it exists")
    sub.add_parser("docs", help="rewrite the config table in README.md from the config dataclasses",
                   description="Rewrite the generated config table in README.md from the config dataclasses' help.")
    return p


def write_readme_table(readme: Path = Path(__file__).resolve().parents[1] / "README.md") -> None:
    block = re.compile(r"(<!-- config-table -->\n).*?(<!-- /config-table -->)", re.S)
    readme.write_text(block.sub(lambda m: m.group(1) + config.help_table() + "\n" + m.group(2), readme.read_text()))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "docs":
            write_readme_table()
            return 0
        if args.command == "export":
            if args.out:
                print(f"wrote run {args.run} to {store.export_run(args.store, args.run, args.out, force=args.force)}")
            else:
                files = store.export_parquet(args.store, args.run, args.parquet, force=args.force)
                print(f"wrote run {args.run} to {len(files)} Parquet files in {args.parquet}")
            return 0
        from pipeline import runner  # imports torch: only the commands that train or record pay for it

        cfg = config.load(args.config, args.overrides)
        if args.command == "run":
            runner.run(cfg, force=set(args.force), only=args.only)
        else:
            for row in runner.status(cfg):
                took = f"{row['seconds']:.1f}s" if "seconds" in row else ""
                print(f"{row['stage']:<12} {row['key']}  {row['state']:<7} {took:>8}  {json.dumps(row.get('summary', {}))}")
    except (config.ConfigError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a data file of another user, a .cache that a root container made
        print(f"error: permission denied on {e.filename or 'a file'}; give this user access to it or point the config "
              "elsewhere, then rerun: finished stages are cached and the store is unchanged", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: the disk is full ({e.filename or 'writing'}); free space and rerun: finished stages are "
              "cached and the store is unchanged", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are cached and the store is unchanged; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
