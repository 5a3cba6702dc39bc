"""A chat (OpenAI messages) -> the model's prompt text and its images, in the template the model was trained with.

The messages are: system messages first (optional; their text opens the prompt as a task description line, as
in training with `with_task_description`), then user / assistant pairs, then the user's question. Every earlier
pair is an in-context example (question, answer), with the images of its user message, exactly as
`otterfast generate --example` lays them out (Otter: one `<image>` per image at the start of its turn, so a
message with 3 images is 3 media; OtterHD: every image's patches before BOS, in order).

A video part (`{"type": "video", "frames": [...]}`) is one media whose frames Otter's vision encoder sees
together; Otter's media all have the same frame count, so a video must be the only media of its request.
OtterHD has no video media: the frames are images, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.prompts import TEMPLATES, clean_answer, clean_instruction, prompt
from .errors import ApiError
from .images import decode_data_url, open_image
from .schema import ChatRequest, ImagePart, ServeLimits, TextPart, VideoPart


@dataclass
class Turn:
    text: str
    images: list = field(default_factory=list)  # data URLs until decoded, then PIL images
    video: bool = False  # the images are the frames of one video
    answer: str | None = None  # None: the question being asked


@dataclass
class Chat:
    system: str
    turns: list[Turn]

    def n_images(self) -> int:
        return sum(len(t.images) for t in self.turns)


def _text_of(content, where: str, allow_media: bool) -> Turn:
    if isinstance(content, str):
        return Turn(content)
    texts, images, video = [], [], False
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif not allow_media:
            raise ApiError(400, f"{where}.content.{j}: only text is allowed in this message",
                           code="invalid_value", param=f"{where}.content.{j}")
        elif isinstance(part, ImagePart):
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append((url, f"{where}.content.{j}"))
        elif isinstance(part, VideoPart):
            if video:
                raise ApiError(400, f"{where}: at most one video per message", code="invalid_value", param=where)
            video = True
            images += [(u, f"{where}.content.{j}.frames.{k}") for k, u in enumerate(part.frames)]
    if video and any(isinstance(p, ImagePart) for p in content):
        raise ApiError(400, f"{where}: a video cannot share its message with images", code="invalid_value",
                       param=where)
    return Turn(" ".join(texts), images, video)


def parse_chat(req: ChatRequest, limits: ServeLimits) -> Chat:
    """The messages' structure, checked (no image decoded yet: too many images are refused before any work)."""
    msgs = req.messages
    i = 0
    system = []
    while i < len(msgs) and msgs[i].role in ("system", "developer"):
        system.append(_text_of(msgs[i].content, f"messages.{i}", allow_media=False).text)
        i += 1
    turns: list[Turn] = []
    while i < len(msgs):
        m = msgs[i]
        if m.role != "user":
            raise ApiError(400, f"messages.{i}: expected a user message here, got {m.role} (after any system "
                                "messages, user and assistant alternate and the last message is the user's)",
                           code="invalid_value", param=f"messages.{i}.role")
        turn = _text_of(m.content, f"messages.{i}", allow_media=True)
        if i + 1 < len(msgs):
            a = msgs[i + 1]
            if a.role != "assistant":
                raise ApiError(400, f"messages.{i + 1}: expected an assistant message after a user message, got "
                                    f"{a.role}", code="invalid_value", param=f"messages.{i + 1}.role")
            turn.answer = _text_of(a.content, f"messages.{i + 1}", allow_media=False).text
            i += 1
        turns.append(turn)
        i += 1
    if not turns or turns[-1].answer is not None:
        raise ApiError(400, "messages: the last message must be the user's question", code="invalid_value",
                       param="messages")
    chat = Chat("\n".join(s for s in system if s), turns)
    n = chat.n_images()
    if n > limits.max_images:
        raise ApiError(400, f"messages: {n} images (video frames included), over the limit of {limits.max_images}",
                       code="too_many_images", param="messages")
    return chat


def decode_images(chat: Chat, limits: ServeLimits) -> None:
    """Every data URL -> an RGB image (ApiError 400 naming the part at the first bad one)."""
    for t in chat.turns:
        t.images = [open_image(decode_data_url(url, where), limits.max_image_pixels, where)
                    for url, where in t.images]


@dataclass
class Prompt:
    text: str
    images: list
    video: bool  # Otter: the images are the frames of one media


def render(chat: Chat, template: str, kind: str) -> Prompt:
    """The prompt text (the template's layout, one turn after another) and its images in order."""
    if template == "raw":
        raise ApiError(400, "the raw template leaves media placement to the caller; serve the model with a "
                            "chat template (--template)", code="invalid_value")
    videos = [t for t in chat.turns if t.video]
    if kind == "otter" and videos and (len(videos) > 1 or chat.n_images() != len(videos[0].images)):
        raise ApiError(400, "messages: a video must be the only media of its request (Otter's media all have the "
                            "same number of frames)", code="invalid_value", param="messages")
    tp = TEMPLATES[template]
    text = chat.system + "\n" if chat.system else ""
    images = []
    for t in chat.turns:
        n_media = (1 if t.images else 0) if t.video and kind == "otter" else len(t.images)
        text += prompt(template, clean_instruction(t.text), [], n_media=n_media)
        if t.answer is not None:
            text += tp.answer.format(a=clean_answer(t.answer)) + tp.tail
        images += t.images
    return Prompt(text, images, bool(videos) and kind == "otter")
