"""Hour-long videos, segment by segment: plan the segments, caption each with the model, then
answer from the captions with the same model's language side (issue "Hour-long videos")."""
