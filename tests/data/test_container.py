"""The dataset container: uint8 or float32 storage, the conversion to float32, shards.

Reference for the conversion: NumPy's float32 division p / 255, what every 8-bit loader computed
before genbench kept uint8 (the folder loader in NumPy, the IDX loader in torch, which agree).
"""

import numpy as np
import pytest
import torch

from genbench.data import ImageDataset, shard_range, unit_float
from genbench.data.container import shard_rows, to_unit_tensor
from genbench.errors import GenbenchError


def test_unit_float_is_exactly_the_float32_division_of_before():
    p = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    expected = torch.from_numpy(np.arange(256, dtype=np.float32).reshape(4, 1, 8, 8) / 255.0)
    assert torch.equal(unit_float(p), expected)
    assert torch.equal(unit_float(p), to_unit_tensor(p.numpy(), 255.0))  # the IDX loader's former path
    # and not merely close: multiplying by 1/255 differs in the last bit for some values
    assert not torch.equal(p.float() * (1 / 255), expected)
    assert unit_float(p).dtype == torch.float32 and unit_float(p[:0]).shape == (0, 1, 8, 8)


def test_unit_float_converts_in_chunks(monkeypatch):
    from genbench.data import container

    monkeypatch.setattr(container, "CONVERT_CHUNK", 3 * 12)  # 3 images of 3x2x2 at a time
    p = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    expected = torch.from_numpy(p.numpy().astype(np.float32) / 255.0)
    assert torch.equal(unit_float(p), expected)
    index = torch.tensor([9, 0, 4, 4, 7, 1, 2])
    assert torch.equal(unit_float(p, index), expected[index])
    assert torch.equal(unit_float(expected, index), expected[index])  # float32: indexed as it is


def test_unit_float_leaves_float32_alone_and_refuses_other_dtypes():
    x = torch.rand(2, 1, 3, 3)
    assert unit_float(x) is x
    with pytest.raises(GenbenchError, match="uint8 pixels or float32"):
        unit_float(x.double())


@pytest.mark.parametrize("n", [0, 1, 7, 20, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_that_partition_the_rows(n, world):
    blocks = [shard_range(n, r, world) for r in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert shard_rows(n, None) == slice(None) and shard_rows(n, (1, world) if world > 1 else (0, 1)).start >= 0


def test_a_bad_shard_is_refused():
    with pytest.raises(GenbenchError, match=r"expected 0 <= rank < world, got rank 2 of 2"):
        shard_range(10, 2, 2)


def test_uint8_storage_reads_as_float32():
    p = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = ImageDataset("u8", p, p[:2], train_total=9)
    assert ds.train.dtype == torch.float32 and torch.equal(ds.train, unit_float(p))
    assert torch.equal(ds.float_images("test", slice(0, 1)), unit_float(p[:1]))
    assert ds.shape == (3, 4, 4) and ds.num_train == 9 and len(ds.train_pixels) == 5
    assert "train=5 of 9" in repr(ds) and "dtype=uint8" in repr(ds)
    with pytest.raises(GenbenchError, match="split must be 'train' or 'test'"):
        ds.float_images("val")


def test_image_dataset_checks_its_new_fields():
    p = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(GenbenchError, match="test must be a float32 tensor .* or a uint8 one, got torch.int16"):
        ImageDataset("t", p, p.short())
    with pytest.raises(GenbenchError, match="train_total 3 is less than the 4 train images held"):
        ImageDataset("t", p, p, train_total=3)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(GenbenchError, match="1 class names for 2 classes"):
        ImageDataset("t", p, p, labels, labels, 2, class_names=("a",))
