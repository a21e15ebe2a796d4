"""EasyEdit apply function for RLEdit2 and RLEdit1."""
from ..hypernet.apply import make_apply_function
from .hparams import RLEdit2HyperParams

apply_rledit2_to_model = make_apply_function(RLEdit2HyperParams, "apply_rledit2_to_model")
