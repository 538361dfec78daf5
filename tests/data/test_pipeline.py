"""The input pipeline: order from (seed, epoch), exact resume, process shares, flat memory."""

import tracemalloc

import numpy as np
import pytest

from mtjax.data import augment, pipeline, sources


def _source(n, hw=(8, 8), reads=None):
  """A lazy source whose example i is made on demand (and counted in ``reads``)."""
  def read(i):
    if reads is not None:
      reads.append(i)
    rng = np.random.default_rng(i)
    return {"image": rng.uniform(size=(*hw, 3)).astype(np.float32),
            "segmentation": np.full(hw, i % 7, np.int32),
            "depth": np.full(hw, 1.0 + i, np.float32), "depth_valid": np.ones(hw, bool),
            "normals": np.broadcast_to(np.float32([0.6, 0.0, -0.8]), (*hw, 3)).copy(),
            "index": np.int32(i)}
  return sources.Source(n, read)


def _ids(batch):
  return batch["index"].tolist()


def test_order_is_a_pure_function_of_seed_and_epoch():
  src = _source(20)
  per_epoch = pipeline.steps_per_epoch(20, 4)
  epoch = lambda seed, e: sorted(sum((_ids(pipeline.train_batch(  # noqa: E731
      src, seed=seed, step=e * per_epoch + s, batch_size=4)) for s in range(per_epoch)), []))
  order = lambda seed: [_ids(pipeline.train_batch(src, seed=seed, step=s, batch_size=4))  # noqa
                        for s in range(2 * per_epoch)]
  assert order(3) == order(3)
  assert order(3) != order(4)
  assert epoch(3, 0) == epoch(3, 1) == list(range(20))         # each example once an epoch
  assert order(3)[:per_epoch] != order(3)[per_epoch:]          # epochs reshuffle
  # The in-memory path gives the same batches as the lazy one.
  arrays = sources.read_all(src)
  for step in (0, 7):
    a = pipeline.train_batch(arrays, seed=3, step=step, batch_size=4)
    b = pipeline.train_batch(src, seed=3, step=step, batch_size=4)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_resume_mid_epoch_gives_the_uninterrupted_batches():
  src = _source(10)
  transform = augment.compose(("scale_crop", "hflip"), ())
  kw = dict(seed=5, batch_size=4, transform=transform)
  full = list(pipeline.batches(src, start=0, stop=7, num_workers=2, **kw))
  cut = 3                                                      # epoch 1, batch 1 (2 per epoch)
  pos = pipeline.position(cut, src.size, 4, seed=5)
  assert pos["epoch"] == 1 and pos["batch_in_epoch"] == 1
  start = pipeline.resume_step(pos, src.size, 4, seed=5)
  resumed = list(pipeline.batches(src, start=start, stop=7, num_workers=3, prefetch=1, **kw))
  serial = list(pipeline.batches(src, start=0, stop=7, num_workers=0, **kw))
  assert [s for s, _ in resumed] == list(range(3, 7))
  for (s1, a), (s2, b) in zip(full[cut:] + serial[cut:], resumed + resumed, strict=True):
    assert s1 == s2
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {s1} {k}")
  # The augmentation did something (else this test proves little about its state).
  plain = pipeline.train_batch(src, seed=5, step=3, batch_size=4)
  assert not np.array_equal(plain["image"], resumed[0][1]["image"])
  with pytest.raises(ValueError, match="seed saved 5, now 6"):
    pipeline.resume_step(pos, src.size, 4, seed=6)


def test_each_process_reads_its_share_of_the_global_batch():
  reads = []
  src = _source(16, reads=reads)
  whole = pipeline.train_batch(src, seed=1, step=2, batch_size=8)
  reads.clear()
  shares = [pipeline.train_batch(src, seed=1, step=2, batch_size=8, process_index=p,
                                 process_count=4) for p in range(4)]
  assert len(reads) == 8                                       # nobody reads another's share
  np.testing.assert_array_equal(np.concatenate([s["index"] for s in shares]), whole["index"])
  with pytest.raises(ValueError, match="batch_size: 8 is not a multiple of the process count"):
    pipeline.train_batch(src, seed=1, step=0, batch_size=8, process_count=3)


def test_memory_stays_flat_over_a_split_ten_times_the_buffer():
  hw, batch, workers, prefetch = (32, 32), 4, 2, 2
  example_bytes = 32 * 32 * (3 * 4 + 4 + 4 + 1 + 12) + 4
  buffer_bytes = (workers + prefetch) * batch * example_bytes
  n = 10 * (workers + prefetch) * batch                         # the split: 10x the buffer
  src = _source(n, hw)
  tracemalloc.start()
  try:
    base = tracemalloc.get_traced_memory()[0]
    seen = 0
    for _, b in pipeline.batches(src, seed=0, start=0, stop=n // batch, batch_size=batch,
                                 num_workers=workers, prefetch=prefetch):
      seen += len(b["index"])
      del b
    peak = tracemalloc.get_traced_memory()[1] - base
  finally:
    tracemalloc.stop()
  assert seen == n
  total = n * example_bytes
  # The buffer plus the examples being stacked, never the split.
  assert peak < 2 * buffer_bytes + 2 * batch * example_bytes < total / 3, (peak, total)


def test_eval_batches_read_a_source_in_order_padded_and_masked():
  src = _source(10)
  out = list(pipeline.eval_batches(src, 4))
  assert [b["index"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert out[-1]["mask"].tolist() == [1, 1, 0, 0]
  assert out[-1]["image"].shape == (4, 8, 8, 3)


def test_select_keeps_the_task_keys_and_the_optional_masks():
  src = _source(4)
  read = src.read
  extra = sources.Source(4, lambda i: {**read(i), "normals_valid": np.ones((8, 8), bool),
                                       "depth_mask": np.float32(0.0)})
  got = pipeline.select(extra, ("depth", "depth_valid")).read(0)
  assert set(got) == {"image", "depth", "depth_valid", "normals_valid", "depth_mask"}
  got = pipeline.select(sources.read_all(extra), ("segmentation",))
  assert set(got) == {"image", "segmentation", "normals_valid", "depth_mask"}


def test_grain_reads_the_same_batches():
  src = _source(10)
  kw = dict(seed=5, start=2, stop=7, batch_size=4, transform=augment.compose(("hflip",), ()))
  ref = list(pipeline.batches(src, **kw))
  got = list(pipeline.batches(src, loader="grain", num_workers=2, **kw))
  assert [s for s, _ in got] == list(range(2, 7))
  for (_, a), (_, b) in zip(ref, got, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match=r"loader: got 'tf.data', allowed: \['threads', 'grain'"):
    next(pipeline.batches(src, loader="tf.data", **kw))


def test_grain_worker_processes_read_the_same_batches():
  # One worker process (spawned: it imports mtjax and this module), three augmented batches.
  src = _source(10)
  kw = dict(seed=5, start=2, stop=5, batch_size=4, transform=augment.compose(("hflip",), ()))
  got = list(pipeline.batches(src, loader="grain_processes", num_workers=1, **kw))
  assert [s for s, _ in got] == [2, 3, 4]
  for (_, a), (_, b) in zip(pipeline.batches(src, **kw), got, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
