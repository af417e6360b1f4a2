"""The public API is explicit and pinned."""

import salience


def test_public_names_are_pinned():
    assert sorted(salience.__all__) == sorted([
        "AssetMissingError", "CausalLM", "Cost", "Explanation", "Feature", "ImageClassifier", "InputError", "ModelLoadError",
        "ModelOutputError", "ParameterError", "PatchingResult", "Prediction", "PromptClassifier", "SalienceError",
        "SalienceWarning", "Steering", "Target", "TargetError", "TextClassifier",
        "UnknownMethodError", "ZeroShotClassifier", "__version__", "attribution_patching", "explain", "load_model", "methods", "steer",
    ])
    for name in salience.__all__:
        assert hasattr(salience, name)


def test_every_method_documents_itself():
    for info in salience.methods():
        assert info.summary and info.cost and info.cls.__doc__ and len(info.cls.__doc__) > 80, info.name
