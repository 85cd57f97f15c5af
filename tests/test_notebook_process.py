"""`nbdev_test` runs the notebooks in a pool of worker processes and reuses each worker for several notebooks.
A notebook that `@patch`ed a class it does not define (fastai's `Learner`, as the package once did) left its own
versions of those methods behind, bound to the classes that notebook defined; a later notebook in the same worker
imported the package and got the package's objects, which those methods had to accept. Now the notebooks patch only
their own classes (the first test checks it), and this scenario checks that fastai's `Learner` stays untouched. Whether two such notebooks share
a worker depends on scheduling (CI once failed this way: the tutorial's `fit_recipe` met a package `Recipe`),
so this test makes the sharing certain: it runs the export cells of every patching notebook in one process, as
a reused worker would, then trains through the package for one epoch and loads the trained model back."""
import os
from pathlib import Path

from execnb.nbio import read_nb
from execnb.shell import CaptureShell

NBS = Path(__file__).resolve().parents[1]/'nbs'


def _export_cells(nb):
    return [c for c in nb.cells if c.cell_type == 'code' and c.source.lstrip().startswith('#| export')]


def _patching_notebooks():
    "Notebooks whose exported code patches a class, in the order nbdev lists them"
    return [p for p in sorted(NBS.glob('[0-9]*.ipynb')) if any('@patch' in c.source for c in _export_cells(read_nb(p)))]


def test_notebooks_patch_only_their_own_classes():
    "`@patch` only onto a class the same notebook defines: fastai's classes (`Learner`) are subclassed (`ReIDLearner`), not patched"
    import re
    found = {}
    for p in _patching_notebooks():
        src = '\n'.join(c.source for c in _export_cells(read_nb(p)))
        own = set(re.findall(r'^class (\w+)', src, re.M))
        patched = set(re.findall(r'@patch\s*\n(?:@\w+.*\n)*def \w+\(self:\s*(\w+)', src))
        assert patched <= own, f"{p.name} patches {patched - own}, which it does not define"
        found[p.name] = patched
    assert '03_callbacks.ipynb' in found and not any('Learner' in v for v in found.values()), found


def test_package_works_after_notebooks_patched_in_same_process(tmp_path):
    from fastai.learner import Learner
    import reid_fastai.learner   # imported first (by an earlier notebook in the worker)
    saved = dict(vars(Learner))   # anything the notebooks would change is undone at the end: later tests get fastai's own
    try:
        for nb_path in _patching_notebooks():
            shell = CaptureShell()   # a fresh namespace per notebook, as `nbdev_test` gives each
            for cell in _export_cells(read_nb(nb_path)):
                shell.run(cell.source)
                assert shell.exc is None, f"{nb_path.name}: {shell.exc!r}\n{cell.source[:300]}"
        # fastai's `Learner` is as it was: nothing a notebook defines reaches the package's learners in a reused worker
        assert {k: v for k, v in vars(Learner).items()} == saved

        from reid_fastai.demo import make_demo_dataset
        from reid_fastai.train import reid_train   # the package's objects, as a later notebook imports them
        from reid_fastai.model_io import load_reid_model
        demo = make_demo_dataset(tmp_path/'demo', n_ids=20)
        res = reid_train(data=str(demo), arch='resnet18', pretrained='none', size=(32, 16), p=4, k=2, epochs=1,
                         eval_every=1, out=str(tmp_path/'run'), workers=0, pipeline='pil', quiet=True, checkpoint_every=1,
                         threads=min(2, os.cpu_count() or 1), device='cpu', dl_kwargs=dict(auto_augment=False, pad=2))
        assert res['epochs'] == 1 and 0 <= res['R1'] <= 1, res
        model = load_reid_model(tmp_path/'run')   # the run's export loads back through the package and embeds images
        feats = model.features(sorted((demo/'query').glob('*.jpg'))[:2])
        assert model.size == (32, 16) and feats.shape[0] == 2, (model, feats.shape)
    finally:
        for name in set(vars(Learner)) - set(saved): delattr(Learner, name)
        for name, value in saved.items():
            if vars(Learner).get(name) is not value: setattr(Learner, name, value)
