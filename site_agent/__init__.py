"""The hospital site's agent: data checks, local DP training, the Flower ClientApp."""
