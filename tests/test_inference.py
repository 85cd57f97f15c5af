"""`reid_eval` as a process (good run, one-line errors with exit status 2, `--debug`), checkpoints and class counts,
ONNX with a dynamic batch, and the gallery index's backends. What a notebook cannot express (processes, exit codes,
a missing optional package), kept small: CPU, one thread, a 16-identity demo dataset at 32x16 pixels and timm's
tiny `test_resnet`, trained for one epoch."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch

from reid_fastai.data import reid_df
from reid_fastai.demo import make_demo_dataset
from reid_fastai.train import reid_train
from reid_fastai.recipes import recipe_model
from reid_fastai.data import ReIDInputError
from reid_fastai.model_io import load_reid_model, load_checkpoint_weights
from reid_fastai.model_eval import evaluate_model
from reid_fastai.gallery import GalleryIndex, have_faiss
from reid_fastai.onnx_export import export_onnx, check_onnx, have_onnx, onnx_session

REPO = Path(__file__).resolve().parents[1]
CMD = [sys.executable, '-c', 'from reid_fastai.cli import reid_eval_cli; reid_eval_cli()']
KEYS = ('R1', 'R5', 'R10', 'mAP', 'mINP', 'n_skipped', 'seconds', 'device', 'git_commit', 'weights', 'recipe', 'config')


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines are shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A 16-identity demo dataset (8 training identities) and another one with 12 training identities"
    root = tmp_path_factory.mktemp('data')
    return make_demo_dataset(root/'demo16', n_ids=16, n_cams=3), make_demo_dataset(root/'other24', n_ids=24, n_cams=3, seed=1)


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    "A reid_train output folder: export.pkl, checkpoints/ckpt_001.pth, results.json (8 classes)"
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('run')/'run'
    reid_train(data=str(data[0]), arch='test_resnet', pretrained='none', size=(32, 16), p=4, k=4, epochs=1, eval_every=1,
               out=str(out), workers=0, pipeline='pil', quiet=True, checkpoint_every=1, threads=1, device='cpu')
    return out


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_good_run_writes_results(run, data, tmp_path):
    "A model trained on 8 identities evaluates on a dataset with 12 (the class count does not matter); results.json has the keys"
    out = tmp_path/'eval'
    r = _cli(run/'export.pkl', '--data', data[1], '--out', out, '--device', 'cpu', '--threads', '1', '--rerank', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'R1' in r.stdout and 'mAP' in r.stdout
    res = json.loads((out/'results.json').read_text())
    for k in KEYS: assert k in res, k
    assert 0 <= res['R1'] <= 1 and res['config']['rerank'] is True and res['config']['flip'] is True
    assert res['config']['model_identity']['n_classes'] == 8
    assert res['n_query'] == (reid_df(data[1]).split == 'query').sum()
    assert (out/'cmc.png').stat().st_size > 1000 and (out/'retrieval.png').stat().st_size > 1000


def test_help_lists_options():
    r = _cli('--help')
    assert r.returncode == 0
    for opt in ('--data', '--query', '--gallery', '--no-flip', '--rerank', '--metric', '--ap', '--out', '--device', '--bs', '--debug'):
        assert opt in r.stdout, opt


def _bad_inputs(run, data, tmp):
    "(argv, what stderr must say) for each kind of bad input"
    (tmp/'notes.txt').write_text('not a model')
    (tmp/'empty').mkdir()
    (tmp/'gallery_only').mkdir(); shutil.copytree(data[1]/'bounding_box_test', tmp/'gallery_only'/'bounding_box_test')
    df = reid_df(data[1]); df[df.split == 'train'].to_csv(tmp/'train_only.csv', index=False)
    g = data[1]/'bounding_box_test'
    return [((tmp/'missing.pkl', '--data', data[1]), 'model file'),
            ((tmp/'notes.txt', '--data', data[1]), 'neither an export.pkl'),
            ((run, '--query', tmp/'empty', '--gallery', g), f"query folder {tmp/'empty'} holds no images"),
            ((run, '--data', tmp/'gallery_only'), 'has no query images'),
            ((run, '--data', tmp/'train_only.csv'), 'has no query images (found train'),
            ((run, '--data', data[1], '--metric', 'manhattan'), "metric must be 'euclidean' or 'cosine'"),
            ((run, '--query', data[1]/'query'), 'no gallery folder'),
            ((run, '--data', data[1], '--bogus'), 'unrecognized arguments'),
            ((), 'the following arguments are required: model')]


def test_bad_inputs_one_line_exit_2(run, data, tmp_path):
    "Each bad input: exit status 2, one line on stderr that says what is wrong, and no --out folder created"
    for argv, expected in _bad_inputs(run, data, tmp_path):
        out = tmp_path/'never'
        r = _cli(*argv, *(('--out', out) if argv else ()))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith('reid_eval: error: '), (argv, r.stderr)
        assert expected in lines[0], (argv, lines[0])
        assert not out.exists(), argv


def test_debug_shows_traceback(data, tmp_path):
    r = _cli(tmp_path/'missing.pkl', '--data', data[1], '--debug')
    assert r.returncode == 1 and 'Traceback' in r.stderr and 'ReIDInputError' in r.stderr


def test_checkpoint_into_other_class_count(run):
    "Loading a checkpoint into a network built for another class count fails, naming the file, both counts and the fix"
    ck = run/'checkpoints'/'ckpt_001.pth'
    with pytest.raises(ReIDInputError) as e: load_reid_model(ck, n_classes=5)
    msg = str(e.value)
    assert str(ck) in msg and 'trained on 8 identities' in msg and 'n_classes=5' in msg and 'leave n_classes out' in msg
    with pytest.raises(ReIDInputError) as e: load_checkpoint_weights(recipe_model('paper', 5, arch='test_resnet'), ck)
    msg = str(e.value)
    assert str(ck) in msg and '8 identities' in msg and 'built for 5' in msg and 'n_classes=8' in msg
    m = load_reid_model(ck, device='cpu')   # the count read from the checkpoint: fine
    assert m.identity['n_classes'] == 8 and m.identity['sha1'] == load_reid_model(run/'export.pkl', device='cpu').identity['sha1']


def test_checkpoint_results_json_rebuilds_the_model(run, data):
    "A checkpoint rebuilt from its run's results.json evaluates exactly like the export"
    a = evaluate_model(run/'checkpoints'/'ckpt_001.pth', data[1], device='cpu', verbose=False)
    b = evaluate_model(run/'export.pkl', data[1], device='cpu', verbose=False)
    assert a['mAP'] == pytest.approx(b['mAP'], abs=1e-6) and a['R1'] == pytest.approx(b['R1'], abs=1e-6)


@pytest.mark.skipif(not have_onnx(), reason='needs pip install onnx onnxruntime')
def test_onnx_dynamic_batch(run, data, tmp_path):
    "The exported graph runs at two batch sizes and matches PyTorch on real images"
    f = export_onnx(run/'export.pkl', tmp_path/'m.onnx')
    sess = onnx_session(f)
    assert sess.get_inputs()[0].shape == ['batch', 3, 32, 16]
    files = reid_df(data[1]).path[:5].tolist()
    check = check_onnx(f, run/'export.pkl', files, batch_sizes=(1, 5), repeat=1)
    assert check['shape'].tolist() == [(1, check['shape'].iloc[0][1]), (5, check['shape'].iloc[0][1])]
    assert (check['max_abs_diff'] <= 1e-4 * check['feature_max_abs']).all(), check
    meta = json.loads(sess.get_modelmeta().custom_metadata_map['reid_fastai_identity'])
    assert meta['sha1'] == load_reid_model(run/'export.pkl').identity['sha1']


def test_search_backends_agree_and_torch_fallback(monkeypatch):
    "faiss and torch find the same neighbours; without faiss, 'auto' uses torch and 'faiss' says how to install it"
    g = torch.Generator().manual_seed(0)
    idx = GalleryIndex.from_features(torch.randn(3000, 32, generator=g))
    q = torch.randn(17, 32, generator=g)
    ref = idx.search(q, k=7, backend='torch', chunk_size=500)
    if have_faiss():
        for metric in ('euclidean', 'cosine'):
            a, b = idx.search(q, k=7, backend='faiss', metric=metric), idx.search(q, k=7, backend='torch', metric=metric)
            assert a['index'].tolist() == b['index'].tolist()
            np.testing.assert_allclose(a['distance'], b['distance'], atol=1e-4)
    import reid_fastai.gallery as gallery_mod
    monkeypatch.setattr(gallery_mod, 'have_faiss', lambda: False)
    assert idx.search(q, k=7).attrs['backend'] == 'torch'
    assert idx.search(q, k=7)['index'].tolist() == ref['index'].tolist()
    with pytest.raises(ReIDInputError, match='pip install faiss-cpu'): idx.search(q, backend='faiss')


def test_index_refuses_another_model(run, data, tmp_path):
    "An index saved with one model refuses another (other weights or another input size) on load, add and search"
    m = load_reid_model(run/'export.pkl', device='cpu')
    gallery = sorted((data[1]/'bounding_box_test').iterdir())
    idx = GalleryIndex.build(m, gallery[:20])
    idx.save(tmp_path/'index')
    stranger = load_reid_model(recipe_model('paper', 8, arch='test_resnet'), size=(32, 16), stats=m.stats)
    with pytest.raises(ReIDInputError, match='cannot be compared'): GalleryIndex.load(tmp_path/'index', model=stranger)
    loaded = GalleryIndex.load(tmp_path/'index', model=m)
    with pytest.raises(ReIDInputError, match='rebuild the index'): loaded.add(gallery[20:25], model=stranger)
    with pytest.raises(ReIDInputError, match='@64x32'): loaded.search(gallery[:2], model=m.at_size((64, 32)))
    assert loaded.add(gallery[:25]) == 5 and len(loaded) == 25
    assert np.load(tmp_path/'index'/'features.npy').shape == (20, m.identity['feat_dim'])
