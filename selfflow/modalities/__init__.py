"""Beyond images: video, audio, joint audio-video and robot actions with the same model and methods.

One module per job (docs/modalities.md):

==========================  ================================================================
``tokens``                  patchifiers for any tensor layout (images, space-time, time-frequency,
                            action chunks) and the token layout of several modalities in one sequence
``video``                   moving digits: clips generated deterministically from a seed; GIFs
``audio``                   spoken digits (espeak-ng, or a procedural stand-in), log-mel, Griffin-Lim, WAV
``actions``                 a 2-D pushing task with the gymnasium API and a scripted two-way expert (CPU smoke)
``metaworld``               Meta-World (optional extra): scripted-expert demonstrations, windows, seeded success
``sync``                    audio-video in sync: the digit appears when its name starts; the offset measure
``data``                    the data set a run trains on, for each modality
``model``                   token models: the one DiT over any layout of tokens, modality embeddings
``sampling``                generation with some tokens given (cross-modal generation by masking)
``evaluation``              each modality's measures (per-frame and clip FD, spoken-digit accuracy, success rate)
``cli``                     ``selfflow modality sample|eval``
==========================  ================================================================
"""
