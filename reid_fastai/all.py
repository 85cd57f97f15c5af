"""One import for the public API, as `fastai.vision.all`: `from reid_fastai.all import *`.

Written by hand (nbdev would give it an empty `__all__`): every module's `__all__`, in the order the notebooks build
them. Not here: `reid_fastai.cli` (the console scripts) and `reid_fastai.test_utils` (the tests' fixtures).
"""
from .data import *
from .demo import *
from .images import *
from .augment import *
from .cache import *
from .loaders import *
from .provenance import *
from .models import *
from .jlml import *
from .losses import *
from .callbacks import *
from .checkpoint import *
from .evaluation import *
from .distributed import *
from .recipes import *
from .optim import *
from .learner import *
from .train import *
from .ablation import *
from .model_io import *
from .model_eval import *
from .gallery import *
from .onnx_export import *
