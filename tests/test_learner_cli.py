"""`reid_train` end to end on a tiny dataset: the console script (one process), its bad-input errors (in this process),
seeded reproducibility, an interrupted run resumed from its checkpoint, and a NaN run. What a notebook cannot express
(processes, interruptions), kept small: CPU, num_workers=0, a 16-identity demo dataset at 32x16 pixels."""
import configparser, contextlib, io, json, shutil, subprocess, sys
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback

from reid_fastai.data import reid_df
from reid_fastai.demo import make_demo_dataset
from reid_fastai.checkpoint import load_checkpoint_file
from reid_fastai.train import reid_train
from reid_fastai.cli import reid_train_cli

REPO = Path(__file__).resolve().parents[1]
TINY = dict(recipe='paper', arch='resnet18', pretrained='none', size=(32, 16), p=4, k=4, eval_every=2, lr=1e-3, workers=0,
            seed=3, quiet=True, device='cpu')


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp('data')/'demo16', n_ids=16, n_cams=3))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines are shared; also makes the float sums reproducible
    yield
    torch.set_num_threads(n)


def _weights(out, epoch):
    return load_checkpoint_file(Path(out)/'checkpoints'/f'ckpt_{epoch:03d}.pth')


def _metrics(res): return {k: res[k] for k in ('R1', 'R5', 'R10', 'mAP', 'mINP', 'epochs')}


def _cmd():
    exe = shutil.which('reid_train')
    return [exe] if exe else [sys.executable, '-c', 'from reid_fastai.cli import reid_train_cli; reid_train_cli()']


def test_console_script(tiny_data, tmp_path, capsys):
    "The `reid_train` entry point of settings.ini parses its options (hyphens or underscores) and writes its outputs"
    cfg = configparser.ConfigParser(); cfg.read(REPO/'settings.ini')
    assert 'reid_train=reid_fastai.cli:reid_train_cli' in cfg['DEFAULT']['console_scripts'].replace(' ', '')
    cmd = _cmd()
    with pytest.raises(SystemExit) as e: reid_train_cli(['--help'])   # in this process: the one process is the run below
    help_ = capsys.readouterr().out
    assert e.value.code == 0 and '--eval-every' in help_ and '--list-recipes' in help_ and '--resume' in help_, help_
    assert '--cbs' not in help_ and '--dl-kwargs' not in help_   # Python-only options stay out of --help
    out = tmp_path/'run'
    r = subprocess.run(cmd + ['--data', tiny_data, '--out', str(out), '--arch', 'resnet18', '--epochs', '3',
                              '--size', '32', '16', '--p', '4', '--k', '4', '--eval-every', '2', '--workers', '0',
                              '--seed', '1', '--device', 'cpu', '--threads', '1', '--checkpoint-every', '1', '--pretrained', 'none'],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out/'results.json').read_text())
    for k in ('R1', 'R5', 'R10', 'mAP', 'mINP', 'epochs', 'seconds', 'images_per_s', 'device', 'git_commit', 'config', 'weights'):
        assert k in res, k
    assert res['epochs'] == 3 and 0 <= res['R1'] <= 1 and res['config']['size'] == [32, 16]
    assert (out/'curves.png').stat().st_size > 1000 and (out/'export.pkl').exists()
    assert [f.name for f in (out/'checkpoints').iterdir()] == ['ckpt_003.pth']
    # not a terminal: one line per epoch under a header, '-' where an epoch was not evaluated, no progress-bar frames
    lines = [l for l in r.stdout.splitlines() if l.split() and l.split()[0].isdigit()]
    header = next(l for l in r.stdout.splitlines() if l.split()[:2] == ['epoch', 'train_loss'])
    assert header.split() == ['epoch', 'train_loss', 'R1', 'R5', 'R10', 'mAP', 'mINP', 'time'], header
    assert len(lines) == 3 and lines[0].split()[2] == '-' and lines[1].split()[2] != '-', r.stdout
    assert '\r' not in r.stdout and 'defaults used' in r.stdout
    assert ': 1 CPU threads (asked for)' in r.stdout, r.stdout   # the start-up line says the threads and why (--threads 1)
    assert r.stdout.splitlines()[-1].startswith(f"reid_train: R1 {100 * res['R1']:.1f}%  mAP {100 * res['mAP']:.1f}%"), r.stdout
    hist = (out/'history.csv').read_text().splitlines()
    assert hist[0].startswith('epoch,train_loss,R1') and len(hist) == 4


def _cli(*argv):
    "reid_train_cli in this process: (exit status, stdout, stderr); 0 when it returns"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: reid_train_cli([str(a) for a in argv]); code = 0
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_errors_are_one_line(tiny_data, tmp_path, monkeypatch):
    """Bad input, in this process (the console script runs in `test_console_script`): one line on stderr, a distinct
    exit code, no output folder; a corrupt image is found before training"""
    out = tmp_path/'out'
    def run(*args, pretrained='none'): return _cli(*args, '--out', out, '--device', 'cpu', '--pretrained', pretrained, '--threads', 1)
    code, _, err = run('--data', tmp_path/'missing')
    assert code == 2 and err.count('\n') == 1 and err.startswith('reid_train: error: dataset path'), err
    code, _, err = run('--data', tiny_data, '--p', '99')
    assert code == 2 and '--p 8 on the command line' in err and 'Traceback' not in err, err
    code, _, err = run('--data', tiny_data, '--recipe', 'papper')
    assert code == 2 and "unknown recipe 'papper'" in err and 'reid_train --list-recipes' in err and 'list_recipes()' not in err, err
    for pre in ('none', 'imagenet'):   # a typo in the backbone: named at once, with timm's closest names, whatever the weights
        code, _, err = run('--data', tiny_data, '--arch', 'resnet5O', pretrained=pre)
        assert (code, err.count('\n')) == (2, 1) and "arch 'resnet5O' is not a timm model (did you mean resnet50" in err, err
    code, _, err = run('--data', tiny_data, '--epochs', -1)
    assert code == 2 and 'epochs must be 0 or more' in err, err
    one_cam = tmp_path/'one_cam.csv'
    reid_df(tiny_data).assign(camid=2).to_csv(one_cam, index=False)
    code, _, err = run('--data', one_cam)
    assert code == 2 and 'all come from one camera (camid 2)' in err and '--same-camera-ok in reid_train' in err, err
    code, _, err = run('--data', tiny_data, '--recipe', 'attr')   # the attr recipe without its attributes
    assert code == 2 and "recipe 'attr' trains attribute heads" in err and '--attributes FILE' in err, err
    code, _, err = run('--data', tiny_data, '--attributes', Path(tiny_data)/'attributes.csv')   # attributes no head would use
    assert code == 2 and "recipe 'paper' has no attribute heads" in err, err
    code, _, err = run('--data', tiny_data, '--recipe', 'attr', '--attributes', tmp_path/'attrs.mat')
    assert code == 2 and 'attrs.mat' in err and 'does not exist' in err, err
    code, _, err = run('--data', tiny_data, '--batch-size', 64)
    assert (code, err) == (2, 'reid_train: error: unrecognized arguments: --batch-size 64 (reid_train --help lists the options)\n'), err
    assert not out.exists()
    bad_data = tmp_path/'bad'; shutil.copytree(tiny_data, bad_data)
    first = sorted((bad_data/'bounding_box_train').iterdir())[0]
    first.write_bytes(first.read_bytes()[:300])
    small = ('--epochs', 1, '--size', 32, 16, '--p', 4, '--arch', 'resnet18', '--workers', 0)
    code, _, err = run('--data', bad_data, *small)
    assert code == 2 and first.name in err and '--skip-bad-images' in err, err
    code, printed, err = run('--data', bad_data, *small, '--skip-bad-images', '--quiet')
    assert code == 0 and f'skipping 1 image(s) that cannot be decoded: {first}' in printed + err, printed + err
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    code, _, err = _cli('--data', tiny_data, '--out', tmp_path/'w', '--device', 'cpu', '--arch', 'resnet18', '--p', 4)
    assert code == 3 and 'Three ways out' in err and not (tmp_path/'w').exists(), err


def test_demo_preset(capsys, monkeypatch, tiny_data, tmp_path):
    "Without --data: the demo dataset and the CPU preset for the options not given, and it says so (no training here)"
    import reid_fastai.demo as d
    from reid_fastai.learner import ReIDLearner
    from reid_fastai.train import DEMO_PRESET
    monkeypatch.setattr(d, 'make_demo_dataset', lambda *a, **k: Path(tiny_data))
    monkeypatch.setattr(ReIDLearner, 'fit_recipe', lambda self, *a, **k: None)
    res = reid_train_cli(['--out', str(tmp_path/'demo'), '--p', '4', '--workers', '0'])
    out = capsys.readouterr().out
    assert 'the demo dataset' in out and f"defaults used: arch={DEMO_PRESET['arch']}" in out and 'p=8' not in out, out
    assert "auto_augment=False (recipe 'paper': True), pad=2" in out, out   # the preset turns off the recipe's AutoAugment: it says so
    cfg = res['config']
    assert (cfg['arch'], cfg['p'], cfg['epochs'], tuple(cfg['size'])) == (DEMO_PRESET['arch'], 4, DEMO_PRESET['epochs'], DEMO_PRESET['size'])


def test_seeded_run_reproduces(tiny_data, tmp_path):
    "Two CPU runs with the same seed give the same metrics and the same weights"
    a = reid_train(data=tiny_data, epochs=2, out=str(tmp_path/'a'), checkpoint_every=2, **TINY)
    b = reid_train(data=tiny_data, epochs=2, out=str(tmp_path/'b'), checkpoint_every=2, **TINY)
    assert _metrics(a) == _metrics(b)
    wa, wb = _weights(tmp_path/'a', 2)['model'], _weights(tmp_path/'b', 2)['model']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Interrupt(Callback):
    "Simulate a crash (Ctrl-C, pre-emption) at the end of epoch `after` (1-based), after its checkpoint was written"
    order = 100
    def __init__(self, after): self.after = after
    def after_epoch(self):
        if self.epoch + 1 == self.after: raise KeyboardInterrupt(f'interrupted after epoch {self.after}')


def test_interrupted_and_resumed_run_ends_like_uninterrupted(tiny_data, tmp_path):
    "4 epochs in one go == 2 epochs, crash, `--resume` to 4: same weights, centres, optimizer states and metrics"
    full = reid_train(data=tiny_data, epochs=4, out=str(tmp_path/'full'), checkpoint_every=1, **TINY)
    with pytest.raises(KeyboardInterrupt):
        reid_train(data=tiny_data, epochs=4, out=str(tmp_path/'cut'), checkpoint_every=1, cbs=[Interrupt(2)], **TINY)
    assert [f.name for f in (tmp_path/'cut'/'checkpoints').iterdir()] == ['ckpt_002.pth']
    resumed = reid_train(data=tiny_data, epochs=4, out=str(tmp_path/'cut'), checkpoint_every=1, resume=True, **TINY)
    assert _metrics(resumed) == _metrics(full)
    assert [h['epoch'] for h in resumed['history']] == [h['epoch'] for h in full['history']] == [1, 3]
    a, b = _weights(tmp_path/'full', 4), _weights(tmp_path/'cut', 4)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for k in a['loss']: assert torch.equal(a['loss'][k], b['loss'][k]), k          # the centres
    sa, sb = a['opt']['state'], b['opt']['state']   # PyTorch's Adam: {param index: {'step', 'exp_avg', 'exp_avg_sq'}}
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) and torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)
    assert a['train_iter'] == b['train_iter']


class PoisonLoss(Callback):
    "Make the loss NaN from epoch `at` (0-based) on, as a diverging run would"
    order = -20  # before NaNStop's check in `after_loss`
    def __init__(self, at): self.at = at
    def after_loss(self):
        if self.training and self.epoch >= self.at:
            self.learn.loss_grad = self.learn.loss_grad * float('nan'); self.learn.loss = self.learn.loss_grad.clone()


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, capsys):
    out = tmp_path/'nan'
    with pytest.warns(RuntimeWarning, match='NaNStop'):
        res = reid_train(data=tiny_data, epochs=4, out=str(out), checkpoint_every=1, cbs=[PoisonLoss(at=2)], **TINY)
    assert res['nan_stop']['epoch'] == 2
    assert 'stopped on a non-finite loss at epoch 2' in capsys.readouterr().out
    assert [f.name for f in (out/'checkpoints').iterdir()] == ['ckpt_002.pth']   # the last good epoch
    ck = load_checkpoint_file(out/'checkpoints'/'ckpt_002.pth')
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert (out/'results.json').exists() and not (out/'export.pkl').exists()
