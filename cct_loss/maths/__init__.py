"""The shared maths: costs and their gradients, the precision policy, the conditional
expectation and the one reduction."""
