from core import hookimpl


def plugin_module_hook(spec):
    @hookimpl
    def ditkit_register_models():
        return [spec]

    return ditkit_register_models


def example_spec():
    from ditkit_example import plugin

    (spec,) = plugin.ditkit_register_models()
    return spec
