"""The device rule for collectives is structural: the package calls ``torch.distributed`` collectives only through
``parallel/collectives.py`` (which places tensors for the group's backend), so a CPU tensor can never reach a
NCCL-only group. A CPU machine cannot run NCCL, so these tests check the rule where it can be checked: in the
source, and in the pure placement function."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_pgpo"

#: torch.distributed functions that move tensors or objects between ranks.
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "barrier",
    "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
    "batch_isend_irecv",
}

#: The one module that owns collectives, and the vocab-parallel autograd functions, which reduce statistics of the
#: logits (on the model's device by construction) over an explicit TP group, like Megatron's cross_entropy.py.
ALLOWED = {"parallel/collectives.py", "parallel/vocab_parallel.py"}


def direct_collectives(source: str) -> list:
    """``[(line, name)]`` of calls to a torch.distributed collective in ``source``: through ``torch.distributed.X``,
    a module alias (``import torch.distributed as dist``, ``from torch import distributed``), or a name imported
    from torch.distributed."""
    tree = ast.parse(source)
    module_aliases = set()
    function_aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    module_aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                module_aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
            elif node.module == "torch.distributed":
                function_aliases.update({a.asname or a.name: a.name for a in node.names if a.name in COLLECTIVES})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = func.value
            if isinstance(owner, ast.Name) and owner.id in module_aliases:
                found.append((node.lineno, func.attr))
            elif (isinstance(owner, ast.Attribute) and owner.attr == "distributed"
                  and isinstance(owner.value, ast.Name) and owner.value.id == "torch"):
                found.append((node.lineno, func.attr))
        elif isinstance(func, ast.Name) and func.id in function_aliases:
            found.append((node.lineno, function_aliases[func.id]))
    return found


def test_no_module_calls_a_collective_directly():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        offenders += [f"{rel}:{line} dist.{name}" for line, name in direct_collectives(path.read_text())]
    assert not offenders, ("collectives must go through megatron_pgpo.parallel.collectives, which places tensors for "
                           "the group's backend:\n" + "\n".join(offenders))


def test_the_checker_finds_each_form_of_a_direct_call():
    source = (
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as td\n"
        "from torch.distributed import all_gather_object as ago, get_rank\n"
        "def f(t):\n"
        "    dist.all_reduce(t)\n"             # 6
        "    torch.distributed.broadcast(t, 0)\n"  # 7
        "    td.barrier()\n"                   # 8
        "    ago([None], 1)\n"                 # 9
        "    dist.get_rank(); get_rank(); dist.new_group([0])\n"  # not collectives
    )
    assert direct_collectives(source) == [(6, "all_reduce"), (7, "broadcast"), (8, "barrier"), (9, "all_gather_object")]


def test_the_scan_fails_when_a_direct_call_is_added(tmp_path):
    """The real loop module with one direct collective appended is caught (the scan above would fail)."""
    loop = (PACKAGE / "trainer" / "loop.py").read_text()
    assert direct_collectives(loop) == []
    tampered = loop + "\n\ndef _sum(t):\n    dist.all_reduce(t)\n    return t\n"
    assert [name for _, name in direct_collectives(tampered)] == ["all_reduce"]


@pytest.mark.parametrize("backend, cuda_index, expected", [
    ("gloo", None, "cpu"),
    ("cpu:gloo,cuda:gloo", None, "cpu"),          # what torch reports for a gloo group
    ("cpu:gloo,cuda:nccl", 3, "cpu"),             # a GPU run's groups: CPU control tensors go through gloo
    ("cuda:nccl", 3, "cuda:3"),                   # NCCL only: CUDA tensors on the current device
    ("nccl", 0, "cuda:0"),
])
def test_device_for_backend(backend, cuda_index, expected):
    from megatron_pgpo.parallel.collectives import device_for_backend

    assert device_for_backend(backend, cuda_index) == torch.device(expected)


@pytest.mark.parametrize("tensor_device, backend, expected", [
    ("cuda:2", "cpu:gloo,cuda:nccl", "cuda:2"),  # weights and activations stay on the GPU: NCCL, no host copy
    ("cpu", "cpu:gloo,cuda:nccl", "cpu"),        # control tensors stay on the CPU: gloo
    ("cpu", "cuda:nccl", "cuda:1"),              # NCCL only: moved to the current device
    ("cpu", "cpu:gloo,cuda:gloo", "cpu"),
    ("meta", "cpu:gloo,cuda:gloo", "cpu"),       # a device type the backend does not take: its preferred one
])
def test_placement_keeps_a_tensor_where_the_backend_takes_it(tensor_device, backend, expected):
    from megatron_pgpo.parallel.collectives import placement

    assert placement(torch.device(tensor_device), backend, cuda_index=1) == torch.device(expected)


def test_nccl_only_without_a_current_cuda_device_is_an_error():
    from megatron_pgpo.parallel.collectives import device_for_backend

    with pytest.raises(ValueError, match="only CUDA tensors"):
        device_for_backend("cuda:nccl", None)
    with pytest.raises(ValueError, match="unknown"):
        device_for_backend("carrier-pigeon", None)


def test_collectives_on_a_one_rank_gloo_group():
    import torch.distributed as dist

    from megatron_pgpo.parallel import collectives
    from megatron_pgpo.trainer.launch import free_port

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        t = torch.tensor([1.5, 2.0])
        assert collectives.all_reduce(t) is t and t.tolist() == [1.5, 2.0]
        assert collectives.any_rank(True) and not collectives.any_rank(False)
        assert collectives.all_ranks(True) and not collectives.all_ranks(False)
        assert [p.tolist() for p in collectives.all_gather(torch.arange(3))] == [[0, 1, 2]]
        assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
        assert collectives.broadcast_object("x", src=0) == "x"
        assert collectives.device_for() == torch.device("cpu")
        collectives.barrier()
        collectives.barrier(timeout_s=5)
    finally:
        dist.destroy_process_group()
