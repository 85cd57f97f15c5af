"""Interrupts and resume as a user meets them (issue 20.5), with real processes and real signals: SIGTERM (what a job
scheduler sends) inside an epoch, Ctrl-C (SIGINT) with the default `--checkpoint-every 5`; each saves a checkpoint at
the next batch, says where, exits with 128 + the signal's number, and `--resume` ends where an uninterrupted run ends:
the same weights and metrics, one clean `history.csv`, no junk epoch lines, the smoothed loss going on. Tiny: the
16-identity demo data at 32x16, resnet18 from scratch, CPU, one thread."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd, pytest, torch

from reid_fastai.demo import make_demo_dataset
from reid_fastai.checkpoint import load_checkpoint_file, ReIDCheckpoint
from reid_fastai.cli import reid_train_cli

REPO = Path(__file__).resolve().parents[1]
ARGS = ['--arch', 'resnet18', '--pretrained', 'none', '--size', '32', '16', '--p', '4', '--k', '4', '--epochs', '4',
        '--eval-every', '2', '--workers', '0', '--threads', '1', '--device', 'cpu', '--seed', '5', '--lr', '1e-3']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp('data')/'demo16', n_ids=16, n_cams=3))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv('REID_FASTAI_CACHE', str(tmp_path/'cache'))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env(tmp_path):
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
            'OMP_NUM_THREADS': '1', 'REID_FASTAI_CACHE': str(tmp_path/'cache'), 'PYTHONUNBUFFERED': '1'}


def _epoch_lines(text): return [l.split()[0] for l in text.splitlines() if l.split() and l.split()[0].isdigit()]


def _same_run(a_out, b_out, a_res, b_res):
    "Two runs that ended alike: metrics, final weights and centres bit for bit, and history.csv (times aside)"
    assert {k: a_res[k] for k in ('R1', 'mAP', 'mINP', 'epochs')} == {k: b_res[k] for k in ('R1', 'mAP', 'mINP', 'epochs')}
    (fa,), (fb,) = (list((Path(o)/'checkpoints').glob('*.pth')) for o in (a_out, b_out))
    assert fa.name == fb.name == 'ckpt_004.pth'
    a, b = load_checkpoint_file(fa), load_checkpoint_file(fb)
    for part in ('model', 'loss'):
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), (part, k)
    ha, hb = (pd.read_csv(Path(o)/'history.csv') for o in (a_out, b_out))
    assert list(hb.columns) == list(ha.columns) and list(hb.epoch) == [0, 1, 2, 3]   # one header, every epoch once, in order
    pd.testing.assert_frame_equal(ha.drop(columns='time'), hb.drop(columns='time'))   # train_loss: the smoothing went on


SIGTERM_AT = r'''
import functools, os, signal, sys
from fastai.callback.core import Callback
import reid_fastai.train as train
class SigtermAt(Callback):
    "A scheduler's SIGTERM, sent to this process at epoch 1, batch 1"
    order = 60
    def after_batch(self):
        if self.training and (self.epoch, self.iter) == (1, 1): os.kill(os.getpid(), signal.SIGTERM)
train.reid_train = functools.partial(train.reid_train, cbs=[SigtermAt()])
from reid_fastai.cli import reid_train_cli
reid_train_cli()
'''


def test_sigterm_inside_an_epoch_then_resume(data, tmp_path, capsys):
    "SIGTERM in epoch 1 (cached path): a checkpoint after that batch, exit 143 and where it is; --resume continues exactly there"
    args = ['--data', data, '--pipeline', 'cached'] + ARGS
    ref = reid_train_cli(args + ['--out', str(tmp_path/'ref'), '--quiet'])
    out = tmp_path/'cut'
    r = subprocess.run([sys.executable, '-c', SIGTERM_AT] + args + ['--out', str(out)], capture_output=True, text=True,
                       timeout=600, env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-3000:]
    ck = out/'checkpoints'/'ckpt_001_b0002.pth'
    assert f"reid_train: stopped by SIGTERM in epoch 1 after 2 of its 4 batches: the training state is in {ck}" in r.stderr, r.stderr
    assert '--resume' in r.stderr.splitlines()[-1] and 'Traceback' not in r.stderr
    assert sorted(f.name for f in (out/'checkpoints').iterdir()) == [ck.name] and not (out/'results.json').exists()
    assert _epoch_lines(r.stdout) == ['0']
    capsys.readouterr()
    res = reid_train_cli(args + ['--out', str(out), '--resume'])
    printed = capsys.readouterr().out
    assert 'reid_train: resuming from ckpt_001_b0002.pth, epoch 1, batch 2' in printed, printed
    assert _epoch_lines(printed) == ['1', '2', '3'], printed   # the epochs it trained; no '0 00:00' rows for skipped ones
    _same_run(tmp_path/'ref', out, ref, res)


def test_ctrl_c_with_default_checkpoint_every(data, tmp_path):
    "The console command, Ctrl-C during epoch 1 with --checkpoint-every 5 (the default): saved, said, exit 130; --resume finishes the run"
    args = ['--data', data, '--pipeline', 'pil'] + ARGS
    ref = reid_train_cli(args + ['--out', str(tmp_path/'ref'), '--quiet'])
    out = tmp_path/'cut'
    p = subprocess.Popen([sys.executable, '-c', 'from reid_fastai.cli import reid_train_cli; reid_train_cli()'] + args
                         + ['--out', str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
    try:
        seen = []
        for line in p.stdout:   # epoch 0's line: the run is in epoch 1 now
            seen.append(line)
            if _epoch_lines(line) == ['0']: break
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, ''.join(seen) + rest + err
    files = sorted((out/'checkpoints').glob('*.pth'))
    assert len(files) == 1 and files[0].name.startswith('ckpt_001'), files   # inside epoch 1, or just after it
    assert "reid_train: stopped by SIGINT" in err and f"the training state is in {files[0]}" in err, err
    assert 'SIGINT: stopping at the end of this batch' in err and 'Traceback' not in err
    res = reid_train_cli(args + ['--out', str(out), '--resume', '--quiet'])
    _same_run(tmp_path/'ref', out, ref, res)


def test_a_signal_after_a_failed_fit_is_not_swallowed(tmp_path):
    "A fit that dies in an error leaves its SIGINT handler installed; the next Ctrl-C still raises KeyboardInterrupt at once"
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    class Boom(Callback):
        def after_batch(self): raise RuntimeError('boom')
    items = [(torch.randn(3), torch.randn(1)) for _ in range(8)]
    dls = DataLoaders(DataLoader(items, bs=4), DataLoader(items, bs=4))
    learn = Learner(dls, torch.nn.Linear(3, 1), loss_func=torch.nn.functional.mse_loss, path=tmp_path, cbs=[ReIDCheckpoint(), Boom()])
    before = signal.getsignal(signal.SIGINT)
    with learn.no_bar(), pytest.raises(RuntimeError): learn.fit(1)
    assert isinstance(getattr(signal.getsignal(signal.SIGINT), '__self__', None), ReIDCheckpoint)   # left behind
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before
