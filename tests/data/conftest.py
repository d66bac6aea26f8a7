"""Fixtures shared by the data tests: the suite tokenizer (small corpus) and the tiny model's processor."""
import pytest

from glmv_jax.config import tiny
from glmv_jax.data.tokenizer import suite_tokenizer
from glmv_jax.data.transforms import Processor


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return suite_tokenizer(512, cache_dir=tmp_path_factory.mktemp("tok"), records_per_domain=20)


@pytest.fixture(scope="module")
def proc():
    return Processor.for_model(tiny(), min_pixels=1024, max_pixels=4608)
