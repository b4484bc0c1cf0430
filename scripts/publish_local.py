#!/usr/bin/env python3
"""Publish build/ into a local Hugging Face Hub cache, as a download would.

Lays the variants out the way `huggingface_hub` caches a kernel repository,
so that `kernels.get_kernel(repo_id, version=N)` loads them offline:

    <cache>/kernels--<org>--<name>/
        refs/v<N>                      the commit the version branch points at
        snapshots/<commit>/build/torch-<backend>/...

Use it with:

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache> python -c \\
        'import kernels; kernels.get_kernel("<org>/<name>", version=<N>)'

(`KERNELS_CACHE=<cache>` works in place of `HF_HUB_CACHE`.) The commit is the
sha1 of the published files, so republishing an unchanged build changes
nothing. Files are copied, not linked into blobs/. Publishing replaces this
kernel's whole entry in the cache, other repositories there are untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tomllib
from pathlib import Path


def fail(message: str) -> None:
    sys.exit(f"publish_local.py: error: {message}")


def variant_dirs(build_dir: Path) -> list[Path]:
    """Build variants: directories of build/ that hold a metadata.json."""
    if not build_dir.is_dir():
        fail(f"{build_dir} does not exist, run scripts/build.py first")
    return sorted(p for p in build_dir.iterdir() if (p / "metadata.json").is_file())


def files_of(variants: list[Path]) -> list[tuple[str, Path]]:
    """(path in the repository, local path) of every file to publish, sorted."""
    files = []
    for variant in variants:
        for path in variant.rglob("*"):
            rel = path.relative_to(variant)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                files.append((f"build/{variant.name}/{rel.as_posix()}", path))
    return sorted(files)


def commit_id(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha1()
    for repo_path, path in files:
        h.update(repo_path.encode() + b"\0")
        h.update(hashlib.sha1(path.read_bytes()).digest())
    return h.hexdigest()


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=root / "build",
                        help="directory holding the torch-<backend> variants (default: build/)")
    parser.add_argument("--cache-dir", type=Path, default=root / "build" / "hub-cache",
                        help="Hub cache to publish into (default: build/hub-cache)")
    parser.add_argument("--repo-id", help="default: [general.hub] repo-id of build.toml")
    parser.add_argument("--version", type=int, help="default: [general] version of build.toml")
    args = parser.parse_args()

    with open(root / "build.toml", "rb") as f:
        general = tomllib.load(f)["general"]
    repo_id = args.repo_id or general.get("hub", {}).get("repo-id")
    if not repo_id or repo_id.count("/") != 1:
        fail("no usable repo id: set [general.hub] repo-id in build.toml or pass --repo-id")
    version = args.version if args.version is not None else general["version"]

    files = files_of(variant_dirs(args.build_dir.resolve()))
    if not files:
        fail(f"no build variants (directories with a metadata.json) in {args.build_dir}")
    commit = commit_id(files)

    repo_dir = args.cache_dir.resolve() / ("kernels--" + repo_id.replace("/", "--"))
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    snapshot = repo_dir / "snapshots" / commit
    for repo_path, path in files:
        dest = snapshot / repo_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    (repo_dir / "refs").mkdir(parents=True)
    # No trailing newline: huggingface_hub reads the ref file verbatim.
    (repo_dir / "refs" / f"v{version}").write_text(commit)

    print(f"publish_local.py: {repo_id} v{version} -> {snapshot} ({len(files)} files)")


if __name__ == "__main__":
    main()
