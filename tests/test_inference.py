"""`reid_eval` as a console process (one smoke test), its bad-input errors in-process (one line, exit status 2,
`--debug`), checkpoints and class counts, ONNX with a dynamic batch, and the gallery index's backends. What a notebook
cannot express (a process, exit codes, a missing optional package), kept small: CPU, one thread, the notebooks'
cached small run (`reid_fastai.test_utils.tiny_run`: trained once per source version, shared with them) and a
24-identity demo dataset drawn with another seed."""
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

from reid_fastai.data import reid_df, query_gallery_df
from reid_fastai.demo import make_demo_dataset
from reid_fastai.recipes import recipe_model
from reid_fastai.data import ReIDInputError
from reid_fastai.model_io import load_reid_model, load_checkpoint_weights
from reid_fastai.model_eval import evaluate_model
from reid_fastai.gallery import GalleryIndex, have_faiss
from reid_fastai.onnx_export import export_onnx, check_onnx, have_onnx, onnx_session
from reid_fastai.cli import reid_eval_cli
from reid_fastai.test_utils import tiny_run, cli_exit

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
    "The demo dataset the run was trained on (50 training identities) and another one with 12 test identities"
    return make_demo_dataset(), make_demo_dataset(tmp_path_factory.mktemp('data')/'other24', n_ids=24, n_cams=3, seed=1)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A reid_train output folder: export.pkl, checkpoints/ckpt_002.pth, results.json (50 classes, 64x32, Lite0)"
    out = tmp_path_factory.mktemp('run')/'run'
    tiny_run(out)
    return out


def _cli_in_process(*args):
    "reid_eval_cli's exit status (0 when it returned) and stderr for `args`, in this process"
    return cli_exit(reid_eval_cli, *args)


def test_console_smoke(run, data, tmp_path):
    """The console command in a fresh process: a model trained on 50 identities evaluates on a dataset with 12 (the class
    count does not matter); results.json has the keys; a size other than the training one is one warning line"""
    out = tmp_path/'eval'
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    r = subprocess.run(CMD + [str(a) for a in (run/'export.pkl', '--data', data[1], '--out', out, '--device', 'cpu', '--threads', '1',
                                               '--rerank', '--size', 128, 64)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.splitlines() == ['reid_eval: warning: testing at 128x64, but the model was trained at 64x32 (height x width): its '
                                     'features, and so its scores, are not those of its training size; leave --size out to test at 64x32'], r.stderr
    res = json.loads((out/'results.json').read_text())
    assert r.stdout.splitlines()[-1].startswith(f"evaluate: R1 {100 * res['R1']:.1f}%  mAP {100 * res['mAP']:.1f}%"), r.stdout
    for k in KEYS: assert k in res, k
    assert 0 <= res['R1'] <= 1 and res['config']['rerank'] is True and res['config']['test_flip'] is False   # the run's (the paper recipe's)
    assert res['config']['model_identity']['n_classes'] == 50 and res['config']['train_size'] == [64, 32]
    assert res['n_query'] == (reid_df(data[1]).split == 'query').sum()
    assert (out/'cmc.png').stat().st_size > 1000 and (out/'retrieval.png').stat().st_size > 1000


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e: reid_eval_cli(['--help'])
    assert e.value.code == 0
    help_text = capsys.readouterr().out.replace('_', '-')   # how --help spells multi-word options is the cli module's (issue 20.6)
    for opt in ('--data', '--query', '--gallery', '--no-flip', '--rerank', '--metric', '--ap', '--out', '--device', '--bs', '--debug',
                '--same-camera-ok', '--size'):
        assert opt in help_text, opt


def _bad_inputs(run, data, tmp):
    "(argv, what stderr must say) for each kind of bad input"
    (tmp/'notes.txt').write_text('not a model')
    (tmp/'empty').mkdir()
    (tmp/'gallery_only').mkdir(); shutil.copytree(data[1]/'bounding_box_test', tmp/'gallery_only'/'bounding_box_test')
    df = reid_df(data[1]); df[df.split == 'train'].to_csv(tmp/'train_only.csv', index=False)
    query_gallery_df(data[1]).assign(camid=3).to_csv(tmp/'one_camera.csv', index=False)
    g = data[1]/'bounding_box_test'
    ck = run/'checkpoints'/'ckpt_002.pth'
    return [((tmp/'missing.pkl', '--data', data[1]), 'model file'),
            ((tmp/'notes.txt', '--data', data[1]), 'neither an export.pkl'),
            ((run, '--query', tmp/'empty', '--gallery', g), f"query folder {tmp/'empty'} holds no images"),
            ((run, '--data', tmp/'gallery_only'), 'has no query images'),
            ((run, '--data', tmp/'train_only.csv'), 'has no query images (found train'),
            ((run, '--data', data[1], '--metric', 'manhattan'), "metric must be 'euclidean' or 'cosine'"),
            ((run, '--query', data[1]/'query'), 'no gallery folder'),
            ((run, '--data', data[1], '--bogus'), 'unrecognized arguments'),
            ((run, '--data', tmp/'one_camera.csv'), 'all come from one camera (camid 3)'),
            ((run, '--data', data[1], '--size', 32, 64), 'more than 1.5x off (height and width swapped?)'),
            ((run, '--data', data[1], '--size', 7, 3), 'each side must be at least 16 pixels'),
            ((run, '--data', data[1], '--size', 0, 32), 'is not positive'),
            ((run/'export.pkl', '--data', data[1], '--arch', 'resnet50'), "arch 'resnet50' (--arch) contradicts it"),
            ((run, '--data', data[1], '--recipe', 'bot'), "recipe 'bot' (--recipe) contradicts it"),
            ((ck, '--data', data[1], '--pretrained', 'none'), "pretrained 'none' (--pretrained) implies"),
            ((), 'the following arguments are required: model')]


def test_bad_inputs_one_line_exit_2(run, data, tmp_path):
    "Each bad input: exit status 2, one line on stderr that says what is wrong, and no --out folder created"
    for argv, expected in _bad_inputs(run, data, tmp_path):
        out = tmp_path/'never'
        code, err = _cli_in_process(*argv, *(('--out', out) if argv else ()))
        lines = err.strip().splitlines()
        assert code == 2, (argv, code, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith('reid_eval: error: '), (argv, err)
        assert expected in lines[0], (argv, lines[0])
        assert not out.exists(), argv


def test_one_camera_with_same_camera_ok(run, data, tmp_path):
    "A single-camera test set evaluates with --same-camera-ok, and results.json says so"
    query_gallery_df(data[1]).assign(camid=3).to_csv(tmp_path/'one_camera.csv', index=False)
    with contextlib.redirect_stdout(io.StringIO()) as o:
        res = reid_eval_cli([str(run), '--data', str(tmp_path/'one_camera.csv'), '--same-camera-ok', '--out', str(tmp_path/'ev'), '--threads', '1'])
    assert res['config']['cross_camera'] is False and res['n_skipped'] == 0 and 0 <= res['R1'] <= 1
    assert json.loads((tmp_path/'ev'/'results.json').read_text())['config']['cross_camera'] is False
    assert 'same-camera matches counted' in o.getvalue().splitlines()[-1]


def test_debug_raises(data, tmp_path):
    "With --debug the error is raised (a console script then prints its traceback and exits with status 1)"
    with pytest.raises(ReIDInputError, match='does not exist'): reid_eval_cli([str(tmp_path/'missing.pkl'), '--data', str(data[1]), '--debug'])


def test_checkpoint_into_other_class_count(run):
    "Loading a checkpoint into a network built for another class count fails, naming the file, both counts and the fix"
    ck = run/'checkpoints'/'ckpt_002.pth'
    with pytest.raises(ReIDInputError) as e: load_reid_model(ck, n_classes=5)
    msg = str(e.value)
    assert str(ck) in msg and 'trained on 50 identities' in msg and 'n_classes=5' in msg and 'leave n_classes out' in msg
    with pytest.raises(ReIDInputError) as e: load_checkpoint_weights(recipe_model('paper', 5, arch='tf_efficientnet_lite0'), ck)
    msg = str(e.value)
    assert str(ck) in msg and '50 identities' in msg and 'built for 5' in msg and 'n_classes=50' in msg
    m = load_reid_model(ck, device='cpu')   # the count read from the checkpoint: fine
    assert m.identity['n_classes'] == 50 and m.identity['sha1'] == load_reid_model(run/'export.pkl', device='cpu').identity['sha1']


def test_checkpoint_results_json_rebuilds_the_model(run, data):
    "A checkpoint rebuilt from its run's results.json evaluates exactly like the export"
    a = evaluate_model(run/'checkpoints'/'ckpt_002.pth', data[1], device='cpu', verbose=False)
    b = evaluate_model(run/'export.pkl', data[1], device='cpu', verbose=False)
    assert a['mAP'] == pytest.approx(b['mAP'], abs=1e-6) and a['R1'] == pytest.approx(b['R1'], abs=1e-6)


@pytest.mark.skipif(not have_onnx(), reason='needs pip install onnx onnxruntime')
def test_onnx_dynamic_batch(run, data, tmp_path):
    "The exported graph runs at two batch sizes and matches PyTorch on real images"
    f = export_onnx(run/'export.pkl', tmp_path/'m.onnx')
    sess = onnx_session(f)
    assert sess.get_inputs()[0].shape == ['batch', 3, 64, 32]
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
    stranger = load_reid_model(recipe_model('paper', 50, arch='tf_efficientnet_lite0'), size=(64, 32), stats=m.stats)
    with pytest.raises(ReIDInputError, match='cannot be compared'): GalleryIndex.load(tmp_path/'index', model=stranger)
    loaded = GalleryIndex.load(tmp_path/'index', model=m)
    with pytest.raises(ReIDInputError, match='rebuild the index'): loaded.add(gallery[20:25], model=stranger)
    with pytest.warns(UserWarning, match='testing at 128x64'): bigger = m.at_size((128, 64))
    with pytest.raises(ReIDInputError, match='@128x64'): loaded.search(gallery[:2], model=bigger)
    assert loaded.add(gallery[:25]) == 5 and len(loaded) == 25
    assert np.load(tmp_path/'index'/'features.npy').shape == (20, m.identity['feat_dim'])


def test_no_private_names_cross_modules():
    "No module of the package imports a private name from another; evaluation keeps no private alias"
    import ast, reid_fastai, reid_fastai.evaluation as ev
    pkg = Path(reid_fastai.__file__).parent
    mods = sorted(p.stem for p in pkg.glob('*.py') if p.stem != '_modidx')
    assert {'evaluation', 'model_io', 'train', 'loaders', 'distributed'} <= set(mods)
    for mod in mods:
        for node in ast.walk(ast.parse((pkg/f'{mod}.py').read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').startswith('reid_fastai')):
                private = [a.name for a in node.names if a.name.startswith('_')]
                assert not private, f"{mod} imports {private} from {node.module}"
    assert not any(hasattr(ev, n) for n in ('_retrieval_feature', '_show_image', '_model_device'))   # removed in 62c83a5
