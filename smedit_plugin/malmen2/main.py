"""EasyEdit apply function for MALMEN2 and MALMEN1."""
from ..hypernet.apply import make_apply_function
from .hparams import MALMEN2HyperParams

apply_malmen2_to_model = make_apply_function(MALMEN2HyperParams, "apply_malmen2_to_model")
