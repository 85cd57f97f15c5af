"""Checks of the data modules that a notebook cannot express: data loading and image checks in worker processes.

fastai calls `get_idxs` in the main process and hands chunks of indices to the workers, so identity-balanced
batches, their reproducibility and the error for a broken image must survive `num_workers > 0`.
"""
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from reid_fastai.data import market1501_df  # noqa: E402
from reid_fastai.demo import make_demo_dataset  # noqa: E402
from reid_fastai.cache import BadImagesError  # noqa: E402
from reid_fastai.loaders import reid_dataloaders  # noqa: E402

torch.set_num_threads(1)  # small tensors; extra threads only fight over a shared CI CPU
P, K, WORKERS = 8, 4, 2
SIZE = (64, 32)  # small images keep the run short; the transforms are tested in the notebook


@pytest.fixture(scope="module")
def demo_df(tmp_path_factory):
    # a small private copy: quick to write and independent of data/demo used by the notebooks
    return market1501_df(make_demo_dataset(tmp_path_factory.mktemp("demo"), n_ids=40, seed=1))


def epoch(dl):
    "(labels, camids) of every batch of one epoch"
    return [(b[1].tolist(), b[2].tolist()) for b in dl]


def test_balanced_batches_with_workers(demo_df):
    dls = reid_dataloaders(demo_df, p=P, k=K, num_workers=WORKERS, pipeline="pil", seed=0, device="cpu", size=SIZE)
    assert dls.train.fake_l.num_workers == WORKERS
    batches = epoch(dls.train)
    assert len(batches) == len(dls.train) == len(dls.train_df) // (P * K)
    for labels, _ in batches:
        counts = pd.Series(labels).value_counts()
        assert len(counts) == P and set(counts) == {K}


def test_same_seed_same_batches_with_workers(demo_df):
    a = reid_dataloaders(demo_df, p=P, k=K, num_workers=WORKERS, pipeline="pil", seed=5, device="cpu", size=SIZE)
    b = reid_dataloaders(demo_df, p=P, k=K, num_workers=WORKERS, pipeline="pil", seed=5, device="cpu", size=SIZE)
    single = reid_dataloaders(demo_df, p=P, k=K, num_workers=0, pipeline="pil", seed=5, device="cpu", size=SIZE)
    first = [epoch(a.train) for _ in range(2)]
    assert first == [epoch(b.train) for _ in range(2)]
    assert first == [epoch(single.train) for _ in range(2)]  # workers do not change the order
    assert first[0] != first[1]  # a new epoch draws new batches


def test_test_loader_order_with_workers(demo_df):
    dls = reid_dataloaders(demo_df, p=P, k=K, num_workers=WORKERS, pipeline="pil", device="cpu", size=SIZE)
    pids = torch.cat([b[1] for b in dls.valid]).tolist()
    assert pids == dls.query_df.pid.tolist() + dls.gallery_df.pid.tolist()


def test_broken_image_named_from_worker(demo_df, tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(Path(demo_df.path[0]).read_bytes()[:300])  # truncated JPEG
    df = pd.concat([demo_df, pd.DataFrame({"path": [str(bad)], "pid": [1], "camid": [0], "split": ["gallery"]})],
                   ignore_index=True)
    with pytest.raises(Exception, match="0001_c1s1_000001_00.jpg"):   # checked before training, in WORKERS processes
        reid_dataloaders(df, p=P, k=K, num_workers=WORKERS, pipeline="pil", device="cpu", size=SIZE)
    dls = reid_dataloaders(df, p=P, k=K, num_workers=WORKERS, pipeline="pil", device="cpu", size=SIZE, check_images=False)
    with pytest.raises(Exception, match="0001_c1s1_000001_00.jpg"):   # unchecked: the worker names it
        for _ in dls.valid: pass


def test_two_processes_build_the_same_cache(demo_df, tmp_path):
    "Two processes decoding the same table into the same cache folder at once: both get the right images, one whole file remains"
    import subprocess, sys, textwrap
    paths = tmp_path/'paths.txt'
    paths.write_text('\n'.join(demo_df.path))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from reid_fastai.cache import decode_images
        imgs = decode_images(open({str(paths)!r}).read().split('\\n'), cache_dir={str(tmp_path/'cache')!r}, workers=1, verbose=False)
        torch.save(imgs, sys.argv[1])
    """)
    procs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path/f'out{i}.pt')]) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    from reid_fastai.cache import decode_images
    a, b = (torch.load(tmp_path/f'out{i}.pt') for i in range(2))
    assert torch.equal(a, b) and a.shape == (len(demo_df), 3, 128, 64)
    files = sorted(p.name for p in (tmp_path/'cache').iterdir())
    assert len(files) == 1 and files[0].startswith('decoded-') and files[0].endswith('.bin'), files   # no half-written leftovers
    assert torch.equal(decode_images(demo_df.path, cache_dir=tmp_path/'cache', verbose=False), a)


@pytest.mark.parametrize("pipeline", ["pil", "cached"])
def test_three_kinds_of_bad_image_in_worker_processes(demo_df, tmp_path, pipeline):
    "A truncated JPEG, a file that is no image and an empty file, one per split: all named in one error, in the decoder's words, and all skipped"
    data = Path(demo_df.path[0]).read_bytes()
    bad = {"train": (tmp_path / "0001_c1s1_000001_00.jpg", data[:len(data) // 2]),
           "query": (tmp_path / "0001_c1s1_000002_00.jpg", b"not an image"),
           "gallery": (tmp_path / "0001_c1s1_000003_00.jpg", b"")}
    for f, content in bad.values(): f.write_bytes(content)
    train_pid, test_pid = (int(demo_df[demo_df.split == s].pid.iloc[0]) for s in ("train", "query"))
    extra = pd.DataFrame({"path": [str(f) for f, _ in bad.values()], "pid": [train_pid, test_pid, test_pid], "camid": 0, "split": list(bad)})
    df = pd.concat([demo_df, extra], ignore_index=True)
    kw = dict(p=P, k=K, num_workers=WORKERS, pipeline=pipeline, device="cpu", size=SIZE, cache_dir=tmp_path / "cache")
    with pytest.raises(BadImagesError) as e:
        reid_dataloaders(df, **kw)
    assert sorted(e.value.bad.path) == sorted(str(f) for f, _ in bad.values())
    assert f"{bad['train'][0]}: OSError: image file is truncated (" in str(e.value), str(e.value)
    dls = reid_dataloaders(df, bad_images="skip", **kw)
    assert (len(dls.train_df), dls.n_query, len(dls.gallery_df)) == tuple((demo_df.split == s).sum() for s in ("train", "query", "gallery"))


def test_importing_the_data_modules_adds_no_warning_filter():
    "Warning filters belong to the command-line entry points: importing the data modules leaves the process's filters alone"
    import subprocess, sys
    code = ("import warnings, numpy, pandas, torch, PIL.Image, scipy, fastcore.parallel, fastcore.script, fastai.vision.core, fasttransform; "
            "before = list(warnings.filters); "
            "import reid_fastai.data, reid_fastai.demo, reid_fastai.images, reid_fastai.cache; "
            "print([f for f in warnings.filters if f not in before])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
