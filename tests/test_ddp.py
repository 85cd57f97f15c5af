"""Data-parallel training with `reid_fastai.distributed`, in real processes: `torchrun --nproc_per_node 2` on the CPU (gloo)
on the 16-identity demo data at 32x16 pixels (one thread per process, num_workers=0), and `--nproc_per_node 1`.

- tests/ddp_checks.py: the centre step of two ranks equals a single-process step on the concatenated batch (1e-5), with
  per-rank batch-hard mining, and no callback changes class; the verification head (a loss parameter DDP does not
  wrap) starts from rank 0's weights and stays identical on both ranks as it trains; LR and camera-bias counters agree; a NaN on rank 1 stops
  both ranks within the one-minute collective timeout (fused and fastai optimizers, and a user's subclass of NaNStop);
  SIGTERM to rank 1 alone stops both ranks after the same batch with one checkpoint, and the run resumed from it ends
  as an uninterrupted one; TimeBudget stops both ranks; the gathered and the rank-0 evaluations equal a
  single-process evaluation exactly (PIL and cached paths); SyncBatchNorm is refused on the CPU.
- tests/ddp_train.py: the 'paper' recipe trained as `reid_train` does; the per-rank batches, one results.json, an
  interrupted two-process run resumed from its checkpoint.
The GPU variants (NCCL, SyncBatchNorm) run only where there are GPUs."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

from reid_fastai.data import reid_df
from reid_fastai.demo import make_demo_dataset
from reid_fastai.loaders import balanced_batches

REPO = Path(__file__).resolve().parents[1]
P, K, SEED = 4, 4, 3   # ddp_train.py's batches and seed


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp('data')/'demo16', n_ids=16, n_cams=3))


@pytest.fixture(scope='module')
def train_labels(demo):
    "The training labels as `reid_dataloaders` numbers them"
    tr = reid_df(demo).query("split == 'train'").reset_index(drop=True)
    return np.searchsorted(np.sort(tr.pid.unique()), tr.pid.values)


def torchrun(nproc, script, *args, timeout=300):
    "Run `script` in `nproc` processes under torchrun, with this checkout on the path"
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
           'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore::FutureWarning'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           '--', str(REPO/'tests'/script), *map(str, args)]   # `--`: torchrun would take `--p` for its own option
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def ranks(out, world):
    return [json.loads((Path(out)/f'rank{r}.json').read_text()) for r in range(world)]


def expected_step_labels(labels, world, epoch, n_steps):
    "Labels of each rank's batches: one global draw of P*N identities x K per step (`balanced_batches`), rank r's slice"
    steps = balanced_batches(labels, P * world, K, n_steps, rng=[SEED, epoch])
    return [[labels[s[r*P*K:(r+1)*P*K]].tolist() for s in steps] for r in range(world)]


def check_batches(rs, labels, epochs):
    "The sampler's guarantees for every rank, and the ranks' batches are the expected global draw"
    world = len(rs)
    n = len(labels) // (P * K * world)
    for r in rs:
        assert r['n_train_batches'] == n and r['n_batches'] == [n] * len(epochs)
        assert len(r['batches']) == n * len(epochs)
        for b in r['batches']:
            ids, counts = np.unique(b['labels'], return_counts=True)
            assert len(b['labels']) == P * K and len(ids) == P and set(counts) == {K}   # P distinct identities x K
    for i in range(n * len(epochs)):
        step = [r['batches'][i] for r in rs]
        assert len({(b['epoch'], b['iter'], b['train_iter'], b['lr'], b['camera_iteration']) for b in step}) == 1
        assert len(set(sum((b['labels'] for b in step), []))) == P * world   # ranks of a step: disjoint identities
    for e in epochs:
        want = expected_step_labels(labels, world, e, n)
        for r, w in zip(rs, want): assert [b['labels'] for b in r['batches'] if b['epoch'] == e] == w
    seen = world * n * P * K   # one epoch across the ranks covers the training set about once
    assert len(labels) - P * K * world < seen <= len(labels)
    assert len({r['params'] for r in rs}) == 1 and all(r['centres'] == rs[0]['centres'] for r in rs)   # same weights, same centres


def test_two_process_checks(demo, tmp_path):
    "Centre step, the loss's own parameters (verification head), counters, NaN and time stops, evaluation and SyncBatchNorm in two gloo processes (tests/ddp_checks.py)"
    res = torchrun(2, 'ddp_checks.py', '--data', demo, '--out', tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert 'ddp_checks: all passed' in res.stdout
    c = json.loads((tmp_path/'checks.json').read_text())
    cs = c['centre_step']
    assert cs['max_err_centres'] < 1e-5 and cs['max_err_centre_grads'] < 1e-5 and cs['max_err_model_grads'] < 1e-5
    assert cs['moved'] > 1e-3 and cs['diff_vs_global_mining'] > 1e-3 and cs['centre_steps'] == 1
    for key, steps in (('torch', 3), ('fastai', 1), ('torch_subclass', 3)):   # the subclass: collective too, no hang
        s = c[f'nan_stop_{key}']
        assert (s['stop']['iter'], s['stop']['rank'], s['steps']) == (1, 1, steps)
        assert any('rank 1 of 2' in m for m in s['warned']) and s['seconds'] < 30, s
    i = c['interrupt']   # rank 1's SIGTERM stopped both ranks after batch 2 of epoch 0; rank 0 wrote one checkpoint
    assert (i['stop']['signal'], i['stop']['epoch'], i['stop']['iter']) == ('SIGTERM', 0, 2) and i['files'] == ['ckpt_000_b0002.pth']
    assert c['time_budget']['epoch'] == 1
    assert c['evaluation']['pil'] == c['evaluation']['cached']   # the two pipelines decode the same images
    assert [it for it, _, cam in c['counters']] == [cam for _, _, cam in c['counters']] == list(range(1, 7))


def test_two_process_training(demo, train_labels, tmp_path):
    "torchrun --nproc_per_node 2, PIL path, one epoch: finishes, one results.json, per-rank P x K batches, exact evaluation"
    out = tmp_path/'run'
    res = torchrun(2, 'ddp_train.py', '--data', demo, '--out', out, '--epochs', 1, '--pipeline', 'pil')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert sorted(f.name for f in out.glob('*.json')) == ['rank0.json', 'rank1.json', 'results.json']
    r = json.loads((out/'results.json').read_text())
    assert r['world_size'] == 2 and r['epochs'] == 1 and r['images'] == 2 * P * K   # rank 0's images: 2 steps
    assert {k: v for k, v in r['history'][-1].items() if k != 'epoch'} == r['reference']   # = one process, exactly
    rs = ranks(out, 2)
    assert all(x['loaders'] == ['ReIDBalancedDL'] for x in rs)   # this rank's batches (its own sampler), not fastai's DistributedDL
    assert all((x['loader_after'], x['model_after']) == ('ReIDBalancedDL', 'ReIDNet') for x in rs)   # the context undone
    check_batches(rs, train_labels, epochs=[0])
    assert (out/'export.pkl').exists() and [f.name for f in (out/'checkpoints').iterdir()] == ['ckpt_001.pth']


def test_interrupted_run_resumed(demo, train_labels, tmp_path):
    "Cached path: rank 1 dies after epoch 1's checkpoint; the run resumed under two processes finishes epoch 2 as planned"
    out = tmp_path/'run'
    args = ['--data', demo, '--out', out, '--epochs', 2, '--pipeline', 'cached']
    crash = torchrun(2, 'ddp_train.py', *args, '--crash-after', 1)
    assert crash.returncode != 0 and 'rank 1 crashes after epoch 1' in crash.stdout
    assert [f.name for f in (out/'checkpoints').iterdir()] == ['ckpt_001.pth'] and not (out/'results.json').exists()
    res = torchrun(2, 'ddp_train.py', *args, '--resume', '--eval-mode', 'rank0')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert 'resuming from ckpt_001.pth, epoch 1' in res.stdout
    r = json.loads((out/'results.json').read_text())
    assert r['epochs'] == 2 and [h['epoch'] for h in r['history']] == [0, 1]   # epoch 0's metrics from the checkpoint
    assert {k: v for k, v in r['history'][-1].items() if k != 'epoch'} == r['reference']
    rs = ranks(out, 2)
    assert all(x['loaders'] == ['ReIDCachedBalancedDL'] for x in rs)
    n = len(train_labels) // (P * K * 2)
    assert all([b['train_iter'] for b in x['batches']] == list(range(n + 1, 2 * n + 1)) for x in rs)   # counters go on
    check_batches(rs, train_labels, epochs=[1])   # epoch 1 draws what an uninterrupted run draws: seed (SEED, 1)


def test_single_process_torchrun(demo, tmp_path):
    "torchrun --nproc_per_node 1: a single process, the distributed pieces stay out of the way"
    out = tmp_path/'run'
    res = torchrun(1, 'ddp_train.py', '--data', demo, '--out', out, '--epochs', 1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    r, (r0,) = json.loads((out/'results.json').read_text()), ranks(out, 1)
    assert r['world_size'] == 1 and r['epochs'] == 1
    assert r0['loaders'] == ['ReIDBalancedDL'] and r0['n_train_batches'] == 76 // (P * K)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs (NCCL, SyncBatchNorm)')
def test_two_gpus_sync_bn(demo, train_labels, tmp_path):
    "NCCL on two GPUs with SyncBatchNorm, the cached path on the GPU: the same guarantees"
    out = tmp_path/'run'
    res = torchrun(2, 'ddp_train.py', '--data', demo, '--out', out, '--epochs', 1, '--pipeline', 'cached',
                   '--device', 'cuda', '--sync-bn')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rs = ranks(out, 2)
    assert [x['device'] for x in rs] == ['cuda:0', 'cuda:1']
    check_batches(rs, train_labels, epochs=[0])
    r = json.loads((out/'results.json').read_text())
    assert {k: v for k, v in r['history'][-1].items() if k != 'epoch'} == r['reference']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_one_gpu_torchrun(demo, tmp_path):
    "torchrun --nproc_per_node 1 on one GPU"
    out = tmp_path/'run'
    res = torchrun(1, 'ddp_train.py', '--data', demo, '--out', out, '--epochs', 1, '--pipeline', 'cached', '--device', 'cuda')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert json.loads((out/'results.json').read_text())['epochs'] == 1


def test_reid_train_command_two_processes(demo, tmp_path):
    "The issue's one command: `torchrun --standalone --nproc_per_node 2 -- $(which reid_train) ...` on the CPU writes one results.json"
    import shutil
    exe = shutil.which('reid_train')
    if exe is None: pytest.skip('the reid_train console script is not installed (pip install -e .)')
    out = tmp_path/'cli'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'REID_FASTAI_CACHE': str(tmp_path/'cache')}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--', exe, '--data', demo,
           '--out', str(out), '--epochs', '1', '--arch', 'test_resnet', '--pretrained', 'none', '--size', '32', '16',
           '--p', '4', '--k', '4', '--device', 'cpu', '--threads', '1', '--eval-every', '1']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out/'results.json').read_text())
    assert res['config']['world_size'] == 2 and res['epochs'] == 1 and 0 <= res['R1'] <= 1
    assert r.stdout.count('reid_train: R1') == 1   # one process speaks
    assert sorted(f.name for f in out.iterdir()) == ['checkpoints', 'curves.png', 'export.pkl', 'history.csv', 'results.json']
