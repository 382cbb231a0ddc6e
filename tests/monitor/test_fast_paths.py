"""The monitor's fast forms against their plain references (the readable forms they replace)."""
import math
import pathlib

import pytest
import torch

from manualgrad.monitor import stats


def planted(shapes, dtypes, bad, seed):
    """Random tensors with the values of ``bad`` ({tensor index: value}) planted at a random place."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        t = torch.randn(shape, generator=g).to(dtype)
        if i in bad and t.numel():
            t.view(-1)[torch.randint(t.numel(), (1,), generator=g)] = bad[i]
        out.append(t)
    return out


FLAT_MAX = stats.FiniteCheck.FLAT_MAX
SHAPES = [(13, 11), (11,), (0,), (), (129, 127), (FLAT_MAX,), (FLAT_MAX + 1,), (3, 300)]
DTYPES = [torch.float32, torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float32,
          torch.float64]


@pytest.mark.parametrize("seed", range(6))
def test_finite_check_names_the_same_tensors_as_one_sum_per_tensor(seed):
    g = torch.Generator().manual_seed(100 + seed)
    bad = {i: [math.nan, math.inf, -math.inf][int(torch.randint(3, (), generator=g))]
           for i in range(len(SHAPES)) if torch.rand((), generator=g) < 0.4}
    check = stats.FiniteCheck(planted(SHAPES, DTYPES, {}, 0), torch.device("cpu"))
    assert len(check.owner) > len(SHAPES)  # several rows for some tensors, one entry for the largest
    tensors = planted(SHAPES, DTYPES, bad, seed)
    expected = [math.isfinite(stats.probe(t).item()) for t in tensors]
    assert expected == [not (i in bad and tensors[i].numel()) for i in range(len(SHAPES))]  # planted
    assert [math.isfinite(v) for v in check.per_tensor(check(tensors).tolist())] == expected
    # the next call sees only the new values (rows overwritten, padding still 0)
    clean = planted(SHAPES, DTYPES, {}, seed)
    assert all(math.isfinite(v) for v in check.per_tensor(check(clean).tolist()))


@pytest.mark.parametrize("dtype, big", [(torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float64, 1e308),
                                        (torch.float16, 6e4)])
def test_probe_is_finite_for_huge_finite_values_and_not_for_nan_or_inf(dtype, big):
    # a float32 sum of these overflows (but for float16); Σ x s cannot. Lengths around the
    # probe's rows of 256, and past FLAT_MAX (a tensor the check probes alone)
    for n in (0, 1, 255, 256, 257, 3000, FLAT_MAX + 1):
        t = torch.full((n,), big, dtype=dtype)
        assert math.isfinite(stats.probe(t).item()), n
        assert math.isfinite(stats.probe(-t[: n // 2]).item()), n
        for bad in (math.nan, math.inf, -math.inf):
            for at in {0, n // 2, n - 1} if n else ():
                u = t.clone()
                u[at] = bad
                assert not math.isfinite(stats.probe(u).item()), (n, at, bad)
                assert not math.isfinite(stats.probe(u.view(1, n)[:, :].t()).item()), (n, at, bad)
    # the check's buffer rows (its float32, float16 and bfloat16 tensors up to FLAT_MAX elements)
    # are probed the same way; the tensors it sums alone are not (stats.check_sums)
    check = stats.FiniteCheck([torch.zeros(FLAT_MAX), torch.zeros(300), torch.zeros(3, 4, dtype=torch.bfloat16)],
                              torch.device("cpu"))
    huge = [torch.full((FLAT_MAX,), 3e38), torch.full((300,), -3e38), torch.full((3, 4), 3e38, dtype=torch.bfloat16)]
    assert check.per_tensor(check(huge).tolist()) == [0.0, 0.0, 0.0]
    huge[1][7] = math.nan
    out = check.per_tensor(check(huge).tolist())
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == 0.0


def test_finite_check_takes_a_zero_for_a_missing_gradient_and_falls_back_on_a_sparse_one():
    check = stats.FiniteCheck([torch.zeros(4, 5), torch.zeros(5)], torch.device("cpu"))
    out = check.per_tensor(check([torch.zeros(()), torch.tensor([1.0, 2, math.inf, 0, 0])]).tolist())
    assert out[0] == 0.0 and math.isnan(out[1])
    sparse = torch.tensor([[0.0, math.nan, 0, 0, 0]] + [[0.0] * 5] * 3).to_sparse()
    out = check.per_tensor(check([sparse, torch.ones(5)]).tolist())
    assert math.isnan(out[0]) and out[1] == 0.0


def test_finite_check_of_gradients_that_require_grad_records_no_graph():
    check = stats.FiniteCheck([torch.zeros(3)], torch.device("cpu"))
    g = torch.ones(3, requires_grad=True) * 2  # a create_graph gradient
    out = check([g])
    assert not out.requires_grad and torch.is_grad_enabled()


# -- the event file format (tensorboard.py) ------------------------------------------------------


def test_crc32c_and_records_equal_tensorboards_on_random_data():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer.record_writer import RecordWriter

    from manualgrad.monitor import tensorboard as tb

    g = torch.Generator().manual_seed(0)
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c_many([b"123456789"]) == [0xE3069283]
    lengths = list(range(0, 20)) + [255, 256, 1001, tb._CRC_ROWS, tb._CRC_ROWS + 1, 4099]
    datas = [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in lengths]
    expected = []
    for data in datas:
        assert tb.masked_crc32c(data) == masked_crc32c(data), len(data)
        chunks = []
        RecordWriter(type("F", (), {"write": staticmethod(chunks.append)})).write(data)
        assert tb.record(data) == b"".join(chunks)
        expected.append(b"".join(chunks))
    # all at once (one numpy pass over the ones of 1 to _CRC_ROWS bytes), in a shuffled order
    order = torch.randperm(len(datas), generator=g).tolist()
    assert tb.records([datas[i] for i in order]) == [expected[i] for i in order]


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40])
def test_scalar_event_bytes_equal_protobufs(step):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from manualgrad.monitor import tensorboard as tb

    pairs = [("grad/norm", 0.5), ("update/log10_ratio", -3.25), ("nonfinite", 0.0), ("é/ü", math.nan),
             ("x" * 200, math.inf), ("y", -math.inf), ("big", 1e39), ("neg big", -1e300), ("tiny", 1e-46),
             ("rounds", 0.1)]
    for chosen in (pairs, pairs[:1], []):
        expected = event_pb2.Event(wall_time=1765000000.123456, step=step, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in chosen])).SerializeToString()
        assert tb.scalar_event(1765000000.123456, step, chosen) == expected


def event_records(path):
    """Every record of an event file, read by tensorboard's reader: it checks both CRCs of each
    record and raises DataLossError on a mismatch."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    reader, out = PyRecordReader_New(str(path)), []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return out
        out.append(event_pb2.Event.FromString(reader.record()))


@pytest.mark.parametrize("framing", [True, False], ids=["framed-here", "add_summary"])
def test_a_monitored_writers_records_pass_tensorboards_crc_checks(tmp_path, monkeypatch, framing):
    # the monitor frames its own events of a burst as one write to the writer's thread and sets
    # the writer's record writer to frame everything with tensorboard.record (the user's events
    # too, the long ones byte by byte): every record must read back, CRCs checked. A writer built
    # otherwise gets one add_summary per logging step instead.
    from torch.utils.tensorboard import SummaryWriter

    from manualgrad.monitor import GradientMonitor
    from manualgrad.monitor import tensorboard as tb

    if not framing:
        monkeypatch.setattr(tb, "_framing_writer", lambda writer: None)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt, every=1, hist_every=5):
        for step in range(20):
            opt.zero_grad()
            model(torch.randn(6, 5)).square().mean().backward()
            opt.step()
            writer.add_scalar("user/loss", step / 4, step)
            writer.add_text("user/note", "x" * (step * 120), step)  # up to 2.3 KB: past _CRC_ROWS
    records = writer._get_file_writer().event_writer._async_writer._writer
    assert getattr(records, "_frames_with_manualgrad", False) == framing
    writer.close()
    (main,) = tmp_path.glob("events.out.tfevents.*")
    values = {}
    for e in event_records(main):
        for v in e.summary.value:
            values.setdefault(v.tag, {})[e.step] = v
    assert {s: v.simple_value for s, v in values["user/loss"].items()} == {s: s / 4 for s in range(20)}
    assert sorted(values["user/note/text_summary"]) == list(range(20))
    assert sorted(values["global/grad_norm"]) == list(range(20))  # the monitor's, one event a step
    assert sorted(values["hist/grad/0"]) == [0, 5, 10, 15]
    for name in ("0", "2"):
        (layer,) = pathlib.Path(tb.layer_dir(tmp_path, name)).glob("events.out.tfevents.*")
        steps = [e.step for e in event_records(layer) if e.summary.value]
        assert steps == list(range(20))
