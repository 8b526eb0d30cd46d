"""Layer 2, the models and what trains them one step: the Keras architectures, the losses, the
classifier and distiller train steps, an outside teacher, optimizers, metrics, batch slices.
Uses the data layer; knows nothing of folders, runs or reports.
"""
