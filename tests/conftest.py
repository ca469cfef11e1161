"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # the models are tiny: extra threads only spin against the other jobs of a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_model():
    """The shipped toy model, loaded once for the whole session: a test that changes it (hooks, a
    tokenizer, a dtype) puts it back before it ends."""
    from hooked_av import toy

    return toy.load()


@pytest.fixture(scope="session")
def toy_flow_model():
    """The shipped 8-layer toy-flow model (docs/toy.md), loaded once, kept unchanged as toy_model is."""
    from hooked_av import toy

    return toy.load("toy-flow")


@pytest.fixture(scope="session")
def tiny_omni():
    """A random-weight tiny Qwen2.5-Omni Thinker (seed 0) with the test tokenizer and processor parts (16 mel
    bins, 30 s of padding to keep the feature extractor fast), built once: a test that changes it puts it
    back; tests that need their own weights or settings build their own."""
    from media_helpers import tiny_tokenizer
    from omni_helpers import tiny_thinker_config

    from hooked_av import HookedQwen2_5Omni
    from hooked_av.families.qwen2_5_omni.processor import assemble_omni_parts

    torch.manual_seed(0)
    model = HookedQwen2_5Omni.from_config(tiny_thinker_config())
    model.tokenizer = tiny_tokenizer()
    model.processor_parts = assemble_omni_parts(model.tokenizer, num_mel_bins=16, chunk_length=30)
    return model
