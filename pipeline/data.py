"""``make data``: get a competition's files into ``data/<competition>/``, once.

The demo is built offline; any other competition is downloaded with the official kaggle client
(:mod:`pipeline.kaggle_io`). Files land in a temporary folder that is renamed into place only when
complete, so an interrupted download never looks finished. The files are never modified afterwards.
"""

from __future__ import annotations

from pipeline import demo
from pipeline.config import DATA_DIR, config_from_argv, run


def fetch(competition: str) -> bool:
    """Make ``data/<competition>/`` hold the competition's files; False when it already did."""
    dest = DATA_DIR / competition
    if dest.is_dir() and any(dest.iterdir()):
        return False
    if competition == "demo":
        demo.build(dest)
    else:
        from pipeline import kaggle_io

        kaggle_io.download(competition, dest)
    return True


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(argv, "pipeline.data", __doc__)
    if fetch(cfg.competition):
        print(f"data: wrote {DATA_DIR / cfg.competition}/")
    else:
        print(f"data: {DATA_DIR / cfg.competition}/ already present, nothing to do")
    return 0


if __name__ == "__main__":
    run(main)
