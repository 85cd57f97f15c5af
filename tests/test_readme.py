"""Every ```python block of the README runs as shown (in order, in one fresh process, in an empty folder), so the first
thing a newcomer copies works."""
import os, re, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks(md: str) -> list:
    return re.findall(r"```python\n(.*?)```", md, flags=re.S)


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks((REPO/'README.md').read_text())
    assert len(blocks) >= 2, "the README lost its Python examples"
    script = tmp_path/'readme.py'
    script.write_text("import torch; torch.set_num_threads(1)\n" + "\n".join(blocks))
    env = {**os.environ, 'REID_FASTAI_CACHE': str(tmp_path/'cache'), 'PYTHONPATH': str(REPO)}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "'R1'" in r.stdout and 'torch.Size([4,' in r.stdout, r.stdout[-2000:]
