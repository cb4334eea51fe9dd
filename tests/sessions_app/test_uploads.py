"""Zips of training images: pairs of image and caption, and everything refused whole."""

import io
import stat
import zipfile

import pytest

from core.errors import ServiceError
from sessions_app.uploads import MAX_ZIP_MEMBERS, images_from_zip
from tests.helpers import image_bytes


def zip_of(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_images_pair_with_the_txt_beside_them_in_name_order():
    red, blue = image_bytes(color="red"), image_bytes("JPEG", color="blue")
    data = zip_of(
        {
            "set/b.jpg": blue,
            "set/b.txt": b"ohwx dog, \nblue\n",
            "a.png": red,
            "a.txt": "\ufeffohwx dog on grass".encode(),  # a byte-order mark, as Notepad writes
            "c.webp": image_bytes("WEBP"),  # no caption: empty
            "set/": b"",
            "__MACOSX/set/._b.jpg": b"resource fork",
            ".DS_Store": b"finder",
        }
    )

    images = images_from_zip(data, "photos.zip")

    assert [(image.name, image.caption) for image in images] == [
        ("a.png", "ohwx dog on grass"),
        ("c.webp", ""),
        ("set/b.jpg", "ohwx dog, \nblue"),
    ]
    assert images[0].data == red and images[2].data == blue


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../evil.png": image_bytes()}, (), "unsafe path: '../evil.png'"),
        ({"/abs.png": image_bytes()}, (), "unsafe path: '/abs.png'"),
        ({"c:/x.png": image_bytes()}, (), "unsafe path"),
        ({"a.png": image_bytes()}, ("link.png",), "a link: 'link.png'"),
        ({"a.png": image_bytes(), "run.sh": b"rm -rf /"}, (), "'run.sh', which is no image"),
        ({"a.png": image_bytes(), "b.txt": b"caption"}, (), "captions without their image"),
        ({"a.txt": b"caption only"}, (), "captions without their image"),
        ({"notes/": b""}, (), "holds no image"),
        (
            {"a.png": image_bytes(), "a.txt": b"\xff\xfe bad"},
            (),
            "photos.zip: a.txt is not UTF-8 text",
        ),
    ],
)
def test_unsafe_or_unusable_zips_are_refused_whole(members, links, message):
    with pytest.raises(ServiceError) as error:
        images_from_zip(zip_of(members, links), "photos.zip")
    assert error.value.status == 400 and message in error.value.message
    assert error.value.message.startswith("photos.zip")


def test_a_file_that_is_no_zip_is_refused():
    with pytest.raises(ServiceError, match="photos.zip is not a zip file"):
        images_from_zip(image_bytes(), "photos.zip")


def test_a_zip_bomb_is_refused_before_and_while_it_unpacks(settings):
    settings.SDXL_MAX_UPLOAD_MB = 1
    # 2 MB of zeros compress to about 2 KB: the declared sizes give it away.
    bomb = zip_of({"a.png": image_bytes(), "a.txt": b"\0" * (2 * 1024 * 1024)})
    assert len(bomb) < 10_000
    with pytest.raises(ServiceError) as error:
        images_from_zip(bomb, "bomb.zip")
    assert error.value.status == 413 and "more than the limit of 1 MB" in error.value.message

    # A member whose header understates its size is stopped after the declared bytes.
    honest = zip_of({"a.png": image_bytes(), "a.txt": b"x" * 5000})
    lying = honest.replace((5000).to_bytes(4, "little"), (50).to_bytes(4, "little"))
    with pytest.raises(ServiceError, match="cannot be read|larger than its header"):
        images_from_zip(lying, "lying.zip")


def test_more_members_than_the_limit_are_refused():
    members = {f"{index}.txt": b"" for index in range(MAX_ZIP_MEMBERS + 1)}
    with pytest.raises(ServiceError, match=f"more than {MAX_ZIP_MEMBERS} files"):
        images_from_zip(zip_of(members), "many.zip")


def test_a_name_mask_png_beside_an_image_is_its_mask_never_an_image_of_its_own():
    mask = image_bytes(color="white")
    data = zip_of(
        {
            "set/a.jpg": image_bytes("JPEG"),
            "set/a.txt": b"ohwx",
            "set/a_mask.png": mask,
            "b.png": image_bytes(),
        }
    )

    images = images_from_zip(data, "photos.zip")

    assert [(image.name, image.mask) for image in images] == [("b.png", None), ("set/a.jpg", mask)]
    assert images[1].mask_name == "photos.zip: set/a_mask.png"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"a.png": image_bytes(), "b_mask.png": image_bytes()}, "masks without their image"),
        ({"a_mask.png": image_bytes()}, r"masks without their image .*: \['a_mask.png'\]"),
        (
            {"a.png": image_bytes(), "a_mask.png": image_bytes(), "a_mask.jpg": image_bytes()},
            "two masks of a",
        ),
    ],
)
def test_a_mask_without_its_image_or_a_second_mask_is_refused(members, message):
    with pytest.raises(ServiceError, match=message):
        images_from_zip(zip_of(members), "photos.zip")
