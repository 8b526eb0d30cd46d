"""Layer 2, what a trained model is shipped as: the SavedModel and model.keras exports, the
LiteRT flatbuffers and their measurements. Uses layers 0 and 1 only.
"""
