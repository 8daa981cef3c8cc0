"""mkdocs hook: the figures that `make demo` and `make experiment` write (demo_output/,
experiment_output/) are published with the site under the same paths, so that the pages link
to the committed results themselves rather than to copies that could drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("demo_output", "experiment_output")


def on_files(files: Files, config: Any) -> Files:
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.png")):
            files.append(
                File(
                    f"{folder}/{path.name}",
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
