"""Export layer: SavedModel, .keras, TFLite and ONNX with their self-checks; loading any model to predict."""
