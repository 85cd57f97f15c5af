"""Every ```python block of the README runs as shown (in order, in one fresh process, in an empty folder), so the first
thing a newcomer copies works; and so do the README's lines that bring in a foreign dataset (CUHK01), on a small
dataset named as CUHK01 is."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image

from reid_fastai.data import reid_df

REPO = Path(__file__).resolve().parents[1]


def python_blocks(md: str) -> list:
    return re.findall(r"```python\n(.*?)```", md, flags=re.S)


def _env(tmp_path) -> dict:
    "This checkout's package, a cache of the test's own, one thread per process (the machine is shared)"
    return {**os.environ, 'REID_FASTAI_CACHE': str(tmp_path/'cache'), 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks((REPO/'README.md').read_text())
    assert len(blocks) >= 2, "the README lost its Python examples"
    script = tmp_path/'readme.py'
    script.write_text("import torch; torch.set_num_threads(1)\n" + "\n".join(blocks))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "'R1'" in r.stdout and 'torch.Size([4,' in r.stdout, r.stdout[-2000:]


def cuhk01_lines(md: str) -> list:
    "The command lines of the README's CUHK01 block (the first ```sh block after its heading)"
    block = re.search(r"\*\*A foreign dataset as a CSV: CUHK01\.\*\*.*?```sh\n(.*?)```", md, flags=re.S)
    assert block, "the README lost its CUHK01 example"
    return [l for l in block.group(1).splitlines() if l.strip() and not l.lstrip().startswith('#')]


def make_cuhk01(root: Path, pids=range(480, 496)) -> Path:
    "A small dataset named as CUHK01 is: campus/PPPPIII.png, images 001-002 from camera A, 003-004 from camera B (brighter)"
    campus = root/'CUHK01'/'campus'
    campus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p in pids:
        colour = rng.integers(40, 200, 3)
        for i in range(1, 5):
            img = colour + rng.normal(0, 12, (64, 32, 3)) + (40 if i > 2 else 0)
            Image.fromarray(np.clip(img, 0, 255).astype('uint8')).save(campus/f'{p:04d}{i:03d}.png')
    (campus/'Thumbs.db').write_bytes(b'not an image')   # what an unzipped folder may hold besides the images
    return campus


def test_readme_cuhk01_lines_run(tmp_path):
    """The README's two CUHK01 lines, as written: the table, then `reid_train` with the cameras from the naming rule (a
    tiny budget appended to it: 1 epoch of a ResNet-18 from scratch at 32x16)"""
    table_line, train_line = cuhk01_lines((REPO/'README.md').read_text())
    assert train_line.startswith('reid_train --data CUHK01/cuhk01.csv --camid-from '), train_line
    make_cuhk01(tmp_path)   # 6 people to train on (480-485), 10 to test on (486-495)
    budget = ' --epochs 1 --arch resnet18 --pretrained none --size 32 16 --p 4 --k 4 --workers 0 --device cpu --threads 1'
    # the console script as installed; without it (a checkout not installed), the same entry point
    shim = '' if shutil.which('reid_train') else "reid_train() { python -c 'from reid_fastai.cli import reid_train_cli; reid_train_cli()' \"$@\"; }\n"
    r = subprocess.run(['bash', '-c', f"set -euo pipefail\n{shim}{table_line}\n{train_line}{budget}\n"], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    table = pd.read_csv(tmp_path/'CUHK01'/'cuhk01.csv', dtype={'pid': str})
    assert list(table.columns) == ['path', 'pid', 'split'] and table.split.value_counts().to_dict() == {'gallery': 30, 'train': 24, 'query': 10}
    rule = re.search(r"--camid-from '([^']+)'", train_line).group(1)
    df = reid_df(tmp_path/'CUHK01'/'cuhk01.csv', camid_from=rule)
    cams = {s: sorted(set(df[df.split == s].camid)) for s in ('train', 'query', 'gallery')}
    assert (cams, df.attrs['cam_names']) == ({'train': [0, 1], 'query': [0], 'gallery': [0, 1]}, ['A', 'B']), cams
    res = json.loads((tmp_path/'runs'/'cuhk01'/'results.json').read_text())
    assert res['config']['camid_from'] == rule and res['n_skipped'] == 0 and 0 <= res['R1'] <= 1, res
    assert r.stdout.splitlines()[-1].startswith('reid_train: R1 '), r.stdout[-1000:]
