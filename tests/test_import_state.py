"""Importing the package changes nothing outside it: fastai's `Learner` keeps every attribute it had (no method patched
on, none replaced) and no warnings filter is added (filters belong to the command-line entry points). Checked in a
fresh process: the third-party modules the package imports are imported first, so that only the package's own import
is compared."""
import ast, json, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO/'reid_fastai'
MODULES = sorted(f'reid_fastai.{p.stem}' for p in PKG.glob('*.py') if not p.stem.startswith('_'))


def _third_party_imports() -> list:
    "Every module outside the package that its source imports (anywhere in a file), for importing first"
    mods = set()
    for f in PKG.glob('*.py'):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import): mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module: mods.add(node.module)
    return sorted(m for m in mods if m.split('.')[0] not in ('reid_fastai', '__future__'))


SCRIPT = r'''
import importlib, json, sys, warnings
for m in DEPS:
    try: importlib.import_module(m)
    except Exception: pass   # optional packages (onnx, faiss, ...) may be missing: then the package does not need them here
from fastai.learner import Learner
before = dict(vars(Learner))
filters = list(warnings.filters)
for m in MODULES: importlib.import_module(m)
after = dict(vars(Learner))
changed = sorted(k for k in set(before) | set(after) if before.get(k, None) is not after.get(k, None))
added = [repr(f) for f in warnings.filters if f not in filters]
print(json.dumps(dict(changed=changed, added=added, modules=[m for m in MODULES if m in sys.modules])))
'''


def test_import_leaves_fastai_and_warnings_alone():
    code = f"DEPS = {_third_party_imports()!r}\nMODULES = {MODULES!r}\n" + SCRIPT
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1', 'HOME': str(Path.home())})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['modules'] == MODULES and 'reid_fastai.checkpoint' in MODULES
    assert res['changed'] == [], f"importing the package changed fastai's Learner: {res['changed']}"
    assert res['added'] == [], f"importing the package added warnings filters: {res['added']}"
