"""What a plugin author reads when the kit fails or skips: one failure for a reference that does not
load, `invalid_requests` failures that name the field and the request, skips that say what to
install, and a run without the libraries' deprecation noise (each in a pytest run of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def kit_run(pytester: pytest.Pytester, t2i_tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytest run of its own, building into (and reusing) this session's tiny checkpoints."""
    monkeypatch.setenv("T2I_TEST_CACHE", str(t2i_tiny_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytester


def test_a_reference_pipeline_that_fails_to_load_is_one_failure(kit_run: pytest.Pytester) -> None:
    pytest.importorskip("t2i_sd15")
    kit_run.makepyfile(
        test_family="""
        from t2i_core.testing import ProviderConformance

        class TestBroken(ProviderConformance):
            family = "sd15"

            def reference_pipeline(self, folder):
                raise OSError("text_encoder_3 is missing from " + folder)
        """
    )
    names = "matches_the_reference or honours_the_steps"
    result = kit_run.runpytest_subprocess("-p", "no:cacheprovider", "-k", names, "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*ReferenceLoadError: TestBroken.reference_pipeline(*) failed: OSError: text_encoder_3 is missing*",
            "*override reference_pipeline*",
        ]
    )
    result.stdout.fnmatch_lines(["SKIPPED*the reference pipeline failed to load (see *test_matches_the_reference)*"])


def test_invalid_requests_failures_name_the_field_and_the_request(kit_run: pytest.Pytester) -> None:
    pytest.importorskip("t2i_sd15")
    kit_run.makepyfile(
        test_family="""
        from t2i_core.testing import ProviderConformance

        class TestAccepts(ProviderConformance):
            family = "sd15"
            invalid_requests = {"height": {"height": 64}}

        class TestNamesAnother(ProviderConformance):
            family = "sd15"
            invalid_requests = {"width": {"height": 60}}

        class TestNothing(ProviderConformance):
            family = "sd15"
        """
    )
    result = kit_run.runpytest_subprocess("-p", "no:cacheprovider", "-k", "invalid_requests", "-rs")
    result.assert_outcomes(failed=2, skipped=1)
    output = result.stdout.str()
    accepted = "invalid_requests['height'] = {'height': 64}: Engine.resolve accepted the request"
    assert accepted in output and "naming 'height'" in output, output
    assert "the request: GenerationRequest(prompt=" in output and "height=64" in output, output
    assert "invalid_requests['width'] = {'height': 60} was refused, but naming 'height' rather than 'width'" in output
    result.stdout.fnmatch_lines(["SKIPPED*nothing to refuse: family 'sd15' declares no invalid_requests*"])


def test_skips_say_what_to_install(kit_run: pytest.Pytester) -> None:
    kit_run.makepyfile(
        test_needs="""
        from t2i_core.testing import require_family

        def test_needs_a_family_that_is_not_installed():
            require_family("no-such-family")
        """
    )
    result = kit_run.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*needs family 'no-such-family': install the plugin that offers*"])


def test_library_deprecations_are_quiet_and_t2i_s_own_warnings_show(kit_run: pytest.Pytester) -> None:
    kit_run.makepyfile(
        test_noise="""
        import warnings

        def warn(category, module, text):
            warnings.warn_explicit(text, category, module.replace(".", "/") + ".py", 1, module=module)

        def test_warns():
            warn(FutureWarning, "diffusers.pipelines.pipeline_utils", "diffusers-future")
            warn(DeprecationWarning, "transformers.utils", "transformers-deprecated")
            warn(FutureWarning, "torch.nn.modules", "torch-future")
            warn(UserWarning, "diffusers.models", "diffusers-user")
            warn(DeprecationWarning, "t2i_core.engine", "t2i-deprecated")
            warn(FutureWarning, "my_plugin", "plugin-future")
            warn(FutureWarning, "diffusersish", "lookalike-future")
        """
    )
    result = kit_run.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    output = result.stdout.str()
    for quiet in ("diffusers-future", "transformers-deprecated", "torch-future"):
        assert quiet not in output
    for shown in ("diffusers-user", "t2i-deprecated", "plugin-future", "lookalike-future"):
        assert shown in output


def test_a_project_s_own_filters_override_the_kit_s(kit_run: pytest.Pytester) -> None:
    kit_run.makeini("[pytest]\nfilterwarnings =\n    error::FutureWarning:diffusers\n")
    kit_run.makepyfile(
        test_strict="""
        import warnings

        def test_warns():
            warnings.warn_explicit("diffusers-future", FutureWarning, "x.py", 1, module="diffusers.x")
        """
    )
    kit_run.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(failed=1)
