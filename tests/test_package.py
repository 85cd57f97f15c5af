"""The package as a whole: `reid_fastai.all` gives the public API in one import; importing the modules of the learner
side sets no warning filter (filters belong to the command-line entry points); the ablation script uses the package."""
import importlib, json, os, pkgutil, runpy, subprocess, sys
from pathlib import Path

import reid_fastai

REPO = Path(__file__).resolve().parents[1]
NOT_IN_ALL = {'all', 'cli', 'test_utils'}   # the console scripts and the tests' fixtures stay out, as in fastai


def test_all_gives_every_public_name():
    "`from reid_fastai.all import *` gives every name of every module's `__all__` (the same object), and misses no module"
    ns = {}
    exec('from reid_fastai.all import *', ns)
    mods = sorted(m.name for m in pkgutil.iter_modules(reid_fastai.__path__) if not m.name.startswith('_') and m.name not in NOT_IN_ALL)
    all_src = (REPO/'reid_fastai'/'all.py').read_text()
    assert [m for m in mods if f'from .{m} import *' not in all_src] == []
    for m in mods:
        mod = importlib.import_module(f'reid_fastai.{m}')
        assert mod.__all__, m
        missing = [n for n in mod.__all__ if ns.get(n, None) is not getattr(mod, n)]
        assert missing == [], (m, missing)


LEARNER_SIDE = ('augment', 'recipes', 'optim', 'learner', 'ablation', 'test_utils', 'all')

def test_learner_side_sets_no_warning_filter_at_import():
    "Importing the package calls `warnings.filterwarnings`/`simplefilter` from none of these modules"
    code = f"""
import json, os, sys, warnings
calls = []
def spy(f):
    def wrapped(*a, **k): calls.append(sys._getframe(1).f_code.co_filename); return f(*a, **k)
    return wrapped
warnings.filterwarnings, warnings.simplefilter = spy(warnings.filterwarnings), spy(warnings.simplefilter)
import reid_fastai.all, reid_fastai.test_utils
pkg = os.path.dirname(reid_fastai.__file__)
print(json.dumps(sorted({{os.path.basename(c)[:-3] for c in calls if os.path.dirname(c) == pkg}} & set({LEARNER_SIDE!r}))))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], r.stdout


def test_ablation_script_rows_come_from_the_package(capsys):
    "benchmarks/ablation.py holds no figures of its own: its rows are `paper_table`'s"
    from reid_fastai.recipes import paper_table
    script = runpy.run_path(str(REPO/'benchmarks'/'ablation.py'), run_name='ablation')
    assert 'PAPER_ROWS' not in script and 'run_rows' not in script
    rows = script['main'](['--table', '6', '--dry-run'])
    assert rows.equals(paper_table([6])) and '4x16' in capsys.readouterr().out


def test_readme_module_table_lists_every_module():
    "The README's module table names every module of the package, with the notebook that is its source"
    readme = (REPO/'README.md').read_text(encoding='utf-8')
    mods = sorted(m.name for m in pkgutil.iter_modules(reid_fastai.__path__) if not m.name.startswith('_') and m.name != 'all')
    missing = [m for m in mods if f'`reid_fastai.{m}`' not in readme]
    assert missing == [], f"modules missing from the README's table: {missing}"
    import re
    for m in mods:
        src = (REPO/'reid_fastai'/f'{m}.py').read_text(encoding='utf-8')
        nb = re.search(r'File to edit: \.\./nbs/(\w+)\.ipynb', src)
        if nb: assert f'[{nb.group(1)}](nbs/{nb.group(1)}.ipynb) | `reid_fastai.{m}`' in readme, (m, nb.group(1))


def test_notebooks_that_draw_keep_their_figures():
    "A notebook with a drawing cell stores at least one image (executed with MPLBACKEND=Agg, a kernel stores none)"
    import re
    draws = re.compile(r'\b(show_batch|show_results|plot_cmc|show_retrieval|plot_training|plot_loss_terms|plot_distance_hist|'
                       r'show_framed_image|plt\.(subplots|plot|imshow|figure))\(')
    empty = []
    for nb_path in sorted((REPO/'nbs').glob('*.ipynb')):
        cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
        drawing = [c for c in cells if c['cell_type'] == 'code' and not ''.join(c['source']).startswith('#| export')
                   and draws.search(''.join(c['source']))]
        images = sum(1 for c in cells for o in c.get('outputs', []) if any(k.startswith('image/') for k in o.get('data', {})))
        if drawing and not images: empty.append(nb_path.name)
    assert empty == [], f"notebooks that draw but store no figure (re-execute them without MPLBACKEND): {empty}"
