"""Finding a dataset on this machine without the user typing its path.

Order: an explicit path, then ``$LEUKO_DATA_DIR``, then the cache that
``leuko data fetch`` fills, then ``../shared/datasets`` beside the project (the
team's shared copies). With none of them the error says exactly where to put
which files, because "dataset not found" alone helps nobody.
"""

from __future__ import annotations

import os
from pathlib import Path

from leuko.errors import LeukoError
from leuko.paths import datasets_cache_dir

# where each dataset lives inside a data folder (first match wins)
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "pbc": ("pbc", "PBC_dataset_normal_DIB", "pbc/PBC_dataset_normal_DIB"),
    "mooney": ("mooney", "dataset2-master", "blood-cells"),
    "bccd": ("bccd", "BCCD_Dataset/BCCD", "BCCD"),
    "cnmc": ("cnmc", "C-NMC_Leukemia"),
}


def shared_datasets_dir() -> Path | None:
    """``../shared/datasets`` relative to the project checkout or the working directory."""
    here = Path(__file__).resolve()
    candidates = [Path.cwd().parent / "shared" / "datasets", Path.cwd() / "shared" / "datasets"]
    candidates += [p.parent / "shared" / "datasets" for p in here.parents[:5]]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _in(base: Path, name: str) -> Path | None:
    for sub in _SUBDIRS.get(name, (name,)):
        p = base / sub
        if p.is_dir():
            return p
    return None


def resolve_data(name: str, explicit: str | Path | None = None) -> Path:
    """Folder of dataset ``name`` (e.g. ``"pbc"``), searched in the documented order."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise LeukoError(f"--data path does not exist: {p}")
        return p
    tried: list[str] = []
    env = os.environ.get("LEUKO_DATA_DIR")
    if env:
        base = Path(env).expanduser()
        hit = _in(base, name) or (base if base.is_dir() and name == "pbc" and (base / "neutrophil").is_dir() else None)
        if hit:
            return hit
        tried.append(f"$LEUKO_DATA_DIR={base}")
    from leuko.data.fetch import fetched_path

    cache = datasets_cache_dir()
    hit = fetched_path(name)
    if hit:
        return hit
    tried.append(str(cache))
    shared = shared_datasets_dir()
    if shared is not None:
        hit = _in(shared, name)
        if hit:
            return hit
        tried.append(str(shared))
    raise LeukoError(
        f"dataset {name!r} not found (looked in: {', '.join(tried)}). "
        f"Pass --data PATH, set LEUKO_DATA_DIR to a folder containing '{_SUBDIRS.get(name, (name,))[0]}/', "
        f"or run 'leuko data fetch {name}' to download it into {cache / name}"
    )
