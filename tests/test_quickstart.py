"""The README's Python quickstart runs as written (on a small generated photo folder)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import write_colour_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python code block"
    code = blocks[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HIHPQ_CACHE", str(tmp_path / "cache"))  # the feature cache, not in the home folder
    photos = write_colour_folder(tmp_path / "photos" / "holidays", per_class=8)
    (tmp_path / "photos" / "query.jpg").write_bytes((photos / "blue" / "000.png").read_bytes())
    exec(compile(code, "<README.md quickstart>", "exec"), {"__name__": "quickstart"})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().endswith((".png", ".jpg"))]
    assert len(lines) == 10
    assert lines[0].endswith("query.jpg") or "/blue/000.png" in lines[0]  # the query or its twin comes first
    assert sum("/blue/" in ln or ln.endswith("query.jpg") for ln in lines) >= 6
