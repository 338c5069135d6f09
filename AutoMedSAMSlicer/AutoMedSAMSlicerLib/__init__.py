"""AutoMedSAMSlicer's Slicer layer: Logic, MRML conversions, worker backends, dependencies."""
