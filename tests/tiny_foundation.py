"""Tiny randomly initialised SigLIP and CLIP models (32 px, patch 16, width 16, one layer) for the
foundation-model and zero-shot tests."""
import io

LINES = ["a chest x-ray showing the lungs", "a frontal chest radiograph with covid-19 pneumonia",
         "no abnormality clear lungs normal chest", "lung opacity consolidation ground-glass infiltrate",
         "viral pneumonia bilateral interstitial opacities", "an x-ray image of the chest with a lung disease"]


def tiny_siglip():
    """(SigLIPBackbone, SigLIPTokenizer): both towers, with a SentencePiece word vocabulary trained on LINES."""
    import keras_hub
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=buf, vocab_size=60, model_type="WORD",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    tok = keras_hub.models.SigLIPTokenizer(proto=buf.getvalue())
    vision = keras_hub.models.SigLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                  intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.SigLIPTextEncoder(vocabulary_size=tok.vocabulary_size(), embedding_dim=16, hidden_dim=16,
                                              num_layers=1, num_heads=2, intermediate_dim=32, max_sequence_length=8)
    return keras_hub.models.SigLIPBackbone(vision, text), tok


def tiny_clip(vocabulary_size: int, max_sequence_length: int):
    """A CLIPBackbone (both towers, projection 8) for a vocabulary of the given size."""
    import keras_hub

    vision = keras_hub.models.CLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=vocabulary_size, embedding_dim=16, hidden_dim=16,
                                            num_layers=1, num_heads=2, intermediate_dim=32,
                                            max_sequence_length=max_sequence_length)
    return keras_hub.models.CLIPBackbone(vision, text, projection_dim=8)


def tiny_sam(size: int = 64):
    """A SAMBackbone: a two-layer ViTDet image encoder (patch 16) with SAM's prompt encoder and mask decoder."""
    import keras_hub

    enc = keras_hub.models.ViTDetBackbone(hidden_size=16, num_layers=2, intermediate_dim=32, num_heads=2,
                                          global_attention_layer_indices=[1], patch_size=16, num_output_channels=8,
                                          window_size=2, image_shape=(size, size, 3))
    prompt = keras_hub.layers.SAMPromptEncoder(hidden_size=8, image_embedding_size=(size // 16, size // 16),
                                               input_image_size=(size, size), mask_in_channels=16)
    decoder = keras_hub.layers.SAMMaskDecoder(num_layers=2, hidden_size=8, intermediate_dim=32, num_heads=2,
                                              embedding_dim=8, num_multimask_outputs=3, iou_head_depth=3,
                                              iou_head_hidden_dim=8)
    return keras_hub.models.SAMBackbone(image_encoder=enc, prompt_encoder=prompt, mask_decoder=decoder)
