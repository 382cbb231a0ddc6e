"""Every public layer class of torch.nn and every differentiable function of torch.nn.functional
has a manualgrad twin, or is on one of the short lists below, each entry with its reason.

The lists are exact: a torch release that adds a layer or a function fails these tests until it
has a twin (or a reason), and so does a twin that lands while its name is still listed as a gap.
``python -m tests.test_torch_nn_coverage`` prints the table the README shows.
"""
import inspect

import torch.nn as tnn
import torch.nn.functional as TF

import manualgrad.functional as MF
import manualgrad.nn as mnn

# torch.nn classes that need no twin: nothing differentiable of their own.
NOT_LAYERS = {
    "Module": "the base class",
    "Container": "deprecated container base",
    "Sequential": "container: converting it converts what it holds",
    "ModuleList": "container",
    "ModuleDict": "container",
    "ParameterList": "container of parameters, used by the module holding it",
    "ParameterDict": "container of parameters, used by the module holding it",
    "Identity": "returns its input: no backward",
    "DataParallel": "a wrapper running the module it holds on several devices",
    "RNNBase": "abstract base of RNN, LSTM, GRU (which have twins)",
    "RNNCellBase": "abstract base of RNNCell, LSTMCell, GRUCell (which have twins)",
}

# torch.nn.functional names that need no twin.
NOT_DIFFERENTIABLE = {
    "one_hot": "integer output",
    "Optional": "typing.Optional, imported by torch.nn.functional",
    "boolean_dispatch": "torch's helper choosing between two functions (return_indices)",
    "assert_int_or_pair": "argument check",
    "handle_torch_function": "__torch_function__ machinery",
    "has_torch_function": "__torch_function__ machinery",
    "has_torch_function_unary": "__torch_function__ machinery",
    "has_torch_function_variadic": "__torch_function__ machinery",
}

# Open work: layers and functions that still run torch's backward. These lists only shrink.
GAP_LAYERS = set()
GAP_FUNCTIONS = {
    # torch 2.9+'s grouped and fp8-scaled GEMMs (MoE experts, fp8 training), mostly CUDA kernels
    "grouped_mm", "scaled_mm", "scaled_grouped_mm",
}


def torch_layers():
    return sorted(n for n, c in vars(tnn).items()
                  if inspect.isclass(c) and issubclass(c, tnn.Module) and not n.startswith("_"))


def torch_functions():
    return sorted(n for n, f in vars(TF).items()
                  if callable(f) and not n.startswith("_") and not inspect.isclass(f) and not inspect.ismodule(f))


def has_layer_twin(name):
    twin = getattr(mnn, name, None)
    return twin is not None and twin is not getattr(tnn, name) and issubclass(twin, getattr(tnn, name))


def has_function_twin(name):
    twin = getattr(MF, name, None)
    return twin is not None and twin is not getattr(TF, name)


def test_every_torch_nn_layer_has_a_twin_or_a_reason():
    missing = {n for n in torch_layers() if not has_layer_twin(n)}
    assert missing - set(NOT_LAYERS) - GAP_LAYERS == set(), "torch.nn layers without a twin or a listed reason"
    assert GAP_LAYERS & {n for n in torch_layers() if has_layer_twin(n)} == set(), "twins landed: take them off GAP_LAYERS"
    assert set(NOT_LAYERS) <= set(torch_layers()) and GAP_LAYERS <= set(torch_layers()), "stale names in the lists"


def test_every_differentiable_torch_nn_functional_has_a_twin_or_a_reason():
    missing = {n for n in torch_functions() if not has_function_twin(n)}
    assert missing - set(NOT_DIFFERENTIABLE) - GAP_FUNCTIONS == set(), "functions without a twin or a listed reason"
    landed = GAP_FUNCTIONS & {n for n in torch_functions() if has_function_twin(n)}
    assert landed == set(), "twins landed: take them off GAP_FUNCTIONS"
    assert set(NOT_DIFFERENTIABLE) | GAP_FUNCTIONS <= set(torch_functions()), "stale names in the lists"


def table():
    layers, functions = torch_layers(), torch_functions()
    rows = [
        ("torch.nn layer classes", len(layers), sum(map(has_layer_twin, layers)), len(NOT_LAYERS), sorted(GAP_LAYERS)),
        ("torch.nn.functional functions", len(functions), sum(map(has_function_twin, functions)),
         len(NOT_DIFFERENTIABLE), sorted(GAP_FUNCTIONS)),
    ]
    out = ["| | public in torch | with a manualgrad twin | need none | still torch's |", "|---|---|---|---|---|"]
    for what, total, twins, none, gaps in rows:
        out.append(f"| {what} | {total} | {twins} | {none} | {len(gaps)}: {', '.join(gaps) or '-'} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
