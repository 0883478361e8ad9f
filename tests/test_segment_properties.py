"""Property tests of the segment layout (issue 2, part 4): any numpy dtype without
Python objects, any small shape, round-trips through a segment byte for byte."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shmcast.broker import LayoutError, Segment
from shmcast.broker._layout import MAX_DESCR, describe_dtype

# The engine's tests run on both cores of the seqlock (conftest.each_core).
pytestmark = pytest.mark.usefixtures("each_core")

_names = itertools.count()

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

LEAVES = st.one_of(
    hnp.scalar_dtypes(),  # bools, ints, floats, complex, datetimes; both byte orders
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
    st.integers(1, 16).map(lambda n: np.dtype(f"V{n}")),
)
# Nested records with sub-array fields, field titles and arbitrary (unicode) names.
DTYPES = hnp.nested_dtypes(LEAVES, max_leaves=8)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)


def _random(dt: np.dtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """An array of ``dt`` and ``shape`` holding random bytes (NaN payloads included)."""
    count = math.prod(shape)
    raw = np.random.default_rng(seed).bytes(count * dt.itemsize)
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)


def _name() -> str:
    return f"p{next(_names)}"


@SETTINGS
@given(dt=DTYPES, shape=SHAPES, seed=st.integers(0, 2**32 - 1))
def test_any_layout_round_trips(namespace, dt, shape, seed):
    data = _random(dt, shape, seed)
    name = _name()
    if len(describe_dtype(dt)) > MAX_DESCR:
        # The one refusal allowed for such a dtype: its description does not fit.
        with pytest.raises(LayoutError, match="too complex"):
            Segment.create(name, dt, shape)
        assert Segment.list(namespace) == []
        return
    seg = Segment.create(name, dt, shape, slots=3)
    try:
        with seg, Segment.attach(name) as reader:
            assert seg.write(data) == 1
            with seg.loan() as arr:
                arr[...] = data
            wide = np.zeros((*shape, 2), dt)
            wide[..., 1] = data
            assert seg.write(wide[..., 1]) == 3  # a strided source
            assert reader.dtype == dt
            assert reader.dtype.descr == dt.descr
            assert reader.shape == shape
            assert reader.nbytes == data.nbytes
            for v in (1, 2, 3):
                with reader.read(v) as snap:
                    assert snap.array.dtype == dt
                    assert snap.array.shape == shape
                    assert snap.array.tobytes() == data.tobytes()
            assert reader.latest().array.tobytes() == data.tobytes()
    finally:
        Segment.remove(name, namespace=namespace)


@SETTINGS
@given(
    base=LEAVES,
    sub=hnp.array_shapes(min_dims=1, max_dims=2, max_side=3),
    shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_subarray_dtypes_fold_into_the_shape(namespace, base, sub, shape, seed):
    name = _name()
    full = (*shape, *sub)
    data = _random(base, full, seed)
    try:
        with Segment.create(name, np.dtype((base, sub)), shape) as seg:
            assert (seg.dtype, seg.shape) == (base, full)
            seg.write(data)
            with Segment.attach(name) as reader:
                assert (reader.dtype, reader.shape) == (base, full)
                assert reader.latest().array.tobytes() == data.tobytes()
    finally:
        Segment.remove(name, namespace=namespace)


OBJECT_DTYPES = hnp.nested_dtypes(
    st.one_of(st.just(np.dtype(object)), hnp.scalar_dtypes()), max_leaves=5
).filter(lambda d: d.hasobject)


@SETTINGS
@given(dt=OBJECT_DTYPES, shape=SHAPES)
def test_object_dtypes_are_refused(namespace, dt, shape):
    with pytest.raises(LayoutError, match="Python objects"):
        Segment.create(_name(), dt, shape)
    assert Segment.list(namespace) == []


ZERO_SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=3).filter(
    lambda s: 0 in s
)
EMPTY_DTYPES = st.sampled_from(
    [np.dtype("S0"), np.dtype("U0"), np.dtype("V0"), np.dtype([]), np.dtype(("<f8", (0,)))]
)


@SETTINGS
@given(
    layout=st.one_of(
        st.tuples(DTYPES, ZERO_SHAPES),
        st.tuples(EMPTY_DTYPES, SHAPES),
    )
)
def test_zero_size_layouts_are_refused(namespace, layout):
    dt, shape = layout
    with pytest.raises(LayoutError):
        Segment.create(_name(), dt, shape)
    assert Segment.list(namespace) == []


# Layouts hypothesis does not draw: padding, explicit offsets, trailing bytes.
PADDED = {
    "aligned": np.dtype([("a", "u1"), ("b", "<f8")], align=True),
    "nested-aligned": np.dtype(
        [("x", np.dtype([("a", "u1"), ("b", "<f4")], align=True)), ("y", "u1")], align=True
    ),
    "gap": np.dtype({"names": ["a", "b"], "formats": ["<i2", ">i4"], "offsets": [0, 6]}),
    "trailing": np.dtype({"names": ["a"], "formats": ["<i4"], "itemsize": 12}),
}


def _field_bytes(arr: np.ndarray) -> list[bytes]:
    """The bytes of every leaf field, leaving padding out."""
    if arr.dtype.names is None:
        return [arr.tobytes()]
    return [b for name in arr.dtype.names for b in _field_bytes(arr[name])]


@pytest.mark.parametrize("dt", PADDED.values(), ids=PADDED.keys())
def test_padded_records_round_trip(namespace, dt):
    data = _random(dt, (5,), 7)
    try:
        with Segment.create("padded", dt, (5,)) as seg, Segment.attach("padded") as reader:
            seg.write(data)
            assert reader.dtype == dt
            assert reader.dtype.itemsize == dt.itemsize
            assert [reader.dtype.fields[n][1] for n in dt.names] == [
                dt.fields[n][1] for n in dt.names
            ]
            with reader.read() as snap:  # the slot itself, padding bytes included
                assert snap.array.tobytes() == data.tobytes()
            copy = reader.latest().array  # a copy need not keep the padding
            assert _field_bytes(copy) == _field_bytes(data)
    finally:
        Segment.remove("padded", namespace=namespace)


@pytest.mark.parametrize(
    "dt",
    [
        np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [8, 0]}),
        np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 2]}),
    ],
    ids=["out-of-order", "overlapping"],
)
def test_records_numpy_cannot_describe_are_a_layout_error(namespace, dt):
    with pytest.raises(LayoutError, match="order fields by offset"):
        Segment.create("odd", dt, (2,))
    assert Segment.list(namespace) == []
