import pytest

from tipkernels.opd.demo import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The demo's character tokenizer (built in code)."""
    return build_tokenizer()
