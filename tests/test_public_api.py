"""The public names of spin_kernels resolve (the lazy ones included) and nothing else leaks."""

import spin_kernels


def test_public_names_resolve():
    for name in spin_kernels.__all__:
        assert getattr(spin_kernels, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    try:
        spin_kernels.not_a_thing  # noqa: B018
    except AttributeError as exc:
        assert "not_a_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
