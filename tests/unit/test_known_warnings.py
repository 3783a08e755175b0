"""The rank's start-up warning filters silence exactly the listed messages."""
import warnings

from megatron_pgpo.compat.known_warnings import silence_known_warnings


def test_listed_warnings_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed", DeprecationWarning)  # other category
        warnings.warn("something the run should show", UserWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, "Transformer Engine and Apex are not installed"),
        (UserWarning, "something the run should show")]
