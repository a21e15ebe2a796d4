"""EasyEdit apply function for SMEdit."""
from ..hypernet.apply import make_apply_function
from .hparams import SMEditHyperParams

apply_smedit_to_model = make_apply_function(SMEditHyperParams, "apply_smedit_to_model")
