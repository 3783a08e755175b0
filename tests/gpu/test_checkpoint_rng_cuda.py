"""A checkpoint's RNG states on a GPU: the CUDA generator and Megatron's model-parallel RNG tracker come back, so
dropout after a resume draws what it would have drawn."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_and_tracker_rng_states_round_trip_through_the_weights_only_file(tmp_path):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from megatron_pgpo.trainer.checkpoint import _rng_state, _set_rng_state, read_rank_state

    torch.cuda.init()
    model_parallel_cuda_manual_seed(123)  # adds the tracker's model-parallel stream
    torch.save({"rng": _rng_state(), "adam_steps": [None]}, tmp_path / "rng_rank00000.pt")

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(4, device="cuda")
        return torch.rand(4, device="cuda").cpu(), tracked.cpu()

    expected = draws()
    _set_rng_state(read_rank_state(tmp_path / "rng_rank00000.pt")["rng"])
    again = draws()
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
