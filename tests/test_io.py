"""XYZ / extended-XYZ reading: values as written, and every bad input named by file, line and
molecule."""
import math
import re

import pytest
import torch

from aimnet_fast.batch import InputError
from aimnet_fast.io import (EXAMPLE_XYZ, chunk_frames, format_xyz, frames_to_batch, parse_xyz,
                            read_xyz, write_xyz)

WATER = [(8, (0.0, 0.0, 0.1173)), (1, (0.0, 0.7572, -0.4692)), (1, (0.0, -0.7572, -0.4692))]
METHANE = [(6, (0.0, 0.0, 0.0)), (1, (0.629, 0.629, 0.629)), (1, (-0.629, -0.629, 0.629)),
           (1, (-0.629, 0.629, -0.629)), (1, (0.629, -0.629, -0.629))]
HCL = [(17, (0.0, 0.0, 0.0)), (1, (0.0, 0.0, 1.2746))]

SYM = {1: "H", 6: "C", 8: "O", 17: "Cl"}


def plain(*mols, comments=None):
    comments = comments or [f"mol {k}" for k in range(len(mols))]
    out = []
    for mol, c in zip(mols, comments):
        out.append(f"{len(mol)}\n{c}\n")
        out.extend(f"{SYM[z]} {x} {y} {w}\n" for z, (x, y, w) in mol)
    return "".join(out)


def write(tmp_path, text, name="in.xyz"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_plain_multi_frame_values(tmp_path):
    p = write(tmp_path, plain(WATER, METHANE, HCL, comments=["water", "methane", "HCl"]))
    frames = read_xyz(p)
    assert [f.comment for f in frames] == ["water", "methane", "HCl"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.line for f in frames] == [1, 6, 13]
    for f, mol in zip(frames, (WATER, METHANE, HCL)):
        assert f.numbers == [z for z, _ in mol]
        assert f.coord == [list(c) for _, c in mol]
    b = frames_to_batch(frames, dtype=torch.float64)
    assert b.offsets.tolist() == [0, 3, 8, 10]
    assert b.names[1] == f"{p} frame 1 (methane)"
    assert b.coord[9, 2].item() == 1.2746


def test_extended_xyz_parsed_like_plain(tmp_path):
    ext = []
    for k, mol in enumerate((WATER, METHANE)):
        ext.append(f"{len(mol)}\n")
        # species and pos are not the first columns: the reader must follow Properties=.
        ext.append(f'Properties=id:I:1:species:S:1:q:R:1:pos:R:3:forces:R:3 energy=-76.4 '
                   f'name=mol{k} pbc="F F F" comment="a b"\n')
        for a, (z, (x, y, w)) in enumerate(mol):
            ext.append(f"{a} {SYM[z]} 0.5 {x} {y} {w} 0.1 0.2 0.3\n")
    e = read_xyz(write(tmp_path, "".join(ext), "ext.xyz"))
    p = read_xyz(write(tmp_path, plain(WATER, METHANE)))
    assert [f.numbers for f in e] == [f.numbers for f in p]
    assert [f.coord for f in e] == [f.coord for f in p]
    assert e[1].info["name"] == "mol1" and e[1].title == "mol1"
    assert e[0].info["comment"] == "a b" and e[0].info["energy"] == "-76.4"
    torch.testing.assert_close(frames_to_batch(e).coord, frames_to_batch(p).coord, rtol=0, atol=0)


def test_tolerant_forms(tmp_path):
    """Blank lines between frames and at the end, lower/upper-case symbols, atomic numbers as
    the element, Fortran exponents, tabs."""
    text = ("3\nwater\no 0 0 1.173D-1\n1\t0 0.7572 -0.4692\nh 0 -0.7572 -4.692e-1\n\n\n"
            "2\nHCl\nCL 0 0 0\nH 0 0 1.2746\n\n")
    frames = read_xyz(write(tmp_path, text))
    assert [f.numbers for f in frames] == [[8, 1, 1], [17, 1]]
    assert frames[0].coord == [list(c) for _, c in WATER]


def test_write_read_round_trip(tmp_path):
    p = tmp_path / "rt.xyz"
    mols = [([z for z, _ in m], [c for _, c in m]) for m in (WATER, METHANE, HCL)]
    write_xyz(p, mols, ["a", "b", "c"])
    frames = read_xyz(p)
    for f, (n, c) in zip(frames, mols):
        assert f.numbers == n
        torch.testing.assert_close(torch.tensor(f.coord, dtype=torch.float64),
                                   torch.tensor(c, dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError):
        format_xyz([1], [[0, 0, 0]], "two\nlines")


def test_chunks_respect_the_atom_budget(tmp_path):
    frames = read_xyz(write(tmp_path, plain(WATER, METHANE, HCL, WATER)))  # 3, 5, 2, 3 atoms
    assert [[f.index for f in g] for g in chunk_frames(frames, 8)] == [[0, 1], [2, 3]]
    assert [[f.index for f in g] for g in chunk_frames(frames, 4)] == [[0], [1], [2], [3]]
    assert [[f.index for f in g] for g in chunk_frames(frames, 100)] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        list(chunk_frames(frames, 0))


def test_bundled_example_reads_and_validates():
    frames = read_xyz(EXAMPLE_XYZ)
    assert len(frames) >= 5
    b = frames_to_batch(frames)  # validates: supported elements, no overlaps
    assert set(b.numbers.tolist()) == {1, 6, 7, 8, 16, 9, 17}


# -- bad input: each message names the file, the line (parse errors) and the frame -------------

def parse_error(tmp_path, text):
    p = write(tmp_path, text, "bad.xyz")
    with pytest.raises(InputError) as e:
        frames_to_batch(read_xyz(p))
    msg = str(e.value)
    assert str(p) in msg
    return msg


def test_unknown_element_symbol(tmp_path):
    text = plain(WATER) + "2\nthe odd one\nXx 0 0 0\nH 0 0 1\n"
    msg = parse_error(tmp_path, text)
    assert "line 8, frame 1 (the odd one)" in msg and "'Xx'" in msg


def test_element_the_model_does_not_know(tmp_path):
    text = plain(WATER) + "2\nhydrogen bromide\nBr 0 0 0\nH 0 0 1.41\n"
    msg = parse_error(tmp_path, text)
    assert "frame 1 (hydrogen bromide)" in msg and "Br" in msg and "not supported" in msg


def test_atoms_too_close(tmp_path):
    text = plain(METHANE) + "2\nclash\nO 0 0 0\nH 0 0 0.05\n"
    msg = parse_error(tmp_path, text)
    assert "frame 1 (clash)" in msg and "0.0500" in msg and "0.1" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_non_finite_coordinates(tmp_path, value):
    text = plain(WATER) + f"2\nbroken\nO 0 0 0\nH 0 {value} 1\n"
    msg = parse_error(tmp_path, text)
    assert "frame 1 (broken)" in msg and "not finite" in msg and "atom 1" in msg


def test_empty_molecule(tmp_path):
    msg = parse_error(tmp_path, plain(WATER) + "0\nnothing here\n")
    assert "line 6, frame 1 (nothing here)" in msg and "empty" in msg


def test_wrong_number_of_fields(tmp_path):
    msg = parse_error(tmp_path, "2\ndiatomic\nH 0 0 0\nH 0 0.74\n")
    assert "line 4, frame 0 (diatomic)" in msg and "3 fields, expected 4" in msg
    msg = parse_error(tmp_path, "2\ndiatomic\nH 0 0 0\nH 0 0 0.74 1.0\n")
    assert "line 4" in msg and "5 fields" in msg


def test_non_numeric_coordinate(tmp_path):
    msg = parse_error(tmp_path, plain(WATER) + "2\nHCl\nCl 0 0 0\nH 0 zero 1.27\n")
    assert "line 9, frame 1 (HCl)" in msg and "non-numeric" in msg and "zero" in msg


def test_atom_count_larger_than_atom_lines(tmp_path):
    # Frame 0 claims 4 atoms; the next frame's count line shows up where atom 3 should be.
    text = plain(WATER).replace("3\n", "4\n", 1) + plain(HCL)
    msg = parse_error(tmp_path, text)
    assert "line 6, frame 0 (mol 0)" in msg and "4 atoms" in msg and "only 3" in msg


def test_atom_count_smaller_than_atom_lines(tmp_path):
    text = plain(METHANE).replace("5\n", "4\n", 1) + plain(HCL)
    msg = parse_error(tmp_path, text)
    assert "line 7" in msg and "atom count" in msg and "frame 0 (mol 0)" in msg


def test_truncated_file(tmp_path):
    text = plain(WATER) + "5\nmethane\nC 0 0 0\nH 0.629 0.629 0.629\n"
    msg = parse_error(tmp_path, text)
    assert "line 10, frame 1 (methane)" in msg and "truncated" in msg
    msg = parse_error(tmp_path, plain(WATER) + "5\n")
    assert "line 6, frame 1" in msg and "truncated" in msg


def test_count_line_not_a_number(tmp_path):
    msg = parse_error(tmp_path, "three\nwater\nO 0 0 0\n")
    assert "line 1" in msg and "atom count" in msg


def test_bad_properties_header(tmp_path):
    msg = parse_error(tmp_path, "1\nProperties=species:S:1:pos:R energy=1\nH 0 0 0\n")
    assert "line 2, frame 0" in msg and "Properties" in msg
    msg = parse_error(tmp_path, "1\nProperties=species:S:1:xyz:R:3\nH 0 0 0\n")
    assert "pos:R:3" in msg
    msg = parse_error(tmp_path, "1\nProperties=species:S:1:pos:R:3:q:R:1\nH 0 0 0\n")
    assert "line 3, frame 0" in msg and "4 fields" in msg and "expected 5" in msg


def test_periodic_frame_refused(tmp_path):
    msg = parse_error(tmp_path, '1\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 '
                                'pbc="T T T"\nH 0 0 0\n')
    assert "periodic" in msg and "frame 0" in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "none.xyz"))):
        read_xyz(tmp_path / "none.xyz")
    with pytest.raises(InputError, match="no molecule"):
        read_xyz(write(tmp_path, "\n\n", "blank.xyz"))


def test_long_comment_is_shortened_in_names(tmp_path):
    frames = read_xyz(write(tmp_path, plain(HCL, comments=["x" * 200])))
    assert len(frames[0].label) < len(str(tmp_path)) + 110
    assert frames[0].comment == "x" * 200 and not math.isnan(frames[0].coord[1][2])


def test_parse_text_names_its_source():
    frames = parse_xyz(plain(HCL, comments=["HCl"]), source="inline")
    assert frames[0].label == "inline frame 0 (HCl)" and frames[0].numbers == [17, 1]
    with pytest.raises(InputError, match=r"^inline line 3, frame 0 \(HCl\): unknown element 'Q'"):
        parse_xyz("2\nHCl\nQ 0 0 0\nH 0 0 1.27\n", source="inline")
