"""Engine: a model turns work items into images (the protocol, the one pipeline loader, the reference

engine, the compiled tier and the preview models). Plain Python over diffusers, no Ray.
"""
