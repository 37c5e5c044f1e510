/* tokenizer.c: MiniMind's byte-level BPE, exactly as Hugging Face `tokenizers` runs a
 * tokenizer.json of that kind, plus UTF-8-safe streaming and the chat templates.
 *
 * Encoding, in the library's order:
 *   1. added tokens (special or not) are matched literally, leftmost-longest, and map to their ids;
 *   2. the text between them is pre-split with the GPT-2 pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   3. each piece's bytes become byte tokens, and merges apply lowest rank first (leftmost on ties).
 * Any byte string is accepted: bytes that are not valid UTF-8 count as one "other" character each,
 * so decode(encode(bytes)) == bytes always holds.
 *
 * run.c includes this file (one translation unit, like llama2.c); its exports are tokenizer_*,
 * utf8_* and chat_*, and everything else is static.
 */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

/* ============================================================================================
 * Unicode classes for the pre-split pattern
 * ============================================================================================ */

/* BEGIN GENERATED UNICODE TABLES: tests/gen_unicode_tables.py from the Unicode Character
 * Database 15.0.0 (2022-09-02); do not edit by hand */
static const uint32_t unicode_letter[][2] = {
    {0x41,0x5A},{0x61,0x7A},{0xAA,0xAA},{0xB5,0xB5},{0xBA,0xBA},{0xC0,0xD6},{0xD8,0xF6},{0xF8,0x2C1},
    {0x2C6,0x2D1},{0x2E0,0x2E4},{0x2EC,0x2EC},{0x2EE,0x2EE},{0x370,0x374},{0x376,0x377},{0x37A,0x37D},
    {0x37F,0x37F},{0x386,0x386},{0x388,0x38A},{0x38C,0x38C},{0x38E,0x3A1},{0x3A3,0x3F5},{0x3F7,0x481},
    {0x48A,0x52F},{0x531,0x556},{0x559,0x559},{0x560,0x588},{0x5D0,0x5EA},{0x5EF,0x5F2},{0x620,0x64A},
    {0x66E,0x66F},{0x671,0x6D3},{0x6D5,0x6D5},{0x6E5,0x6E6},{0x6EE,0x6EF},{0x6FA,0x6FC},{0x6FF,0x6FF},
    {0x710,0x710},{0x712,0x72F},{0x74D,0x7A5},{0x7B1,0x7B1},{0x7CA,0x7EA},{0x7F4,0x7F5},{0x7FA,0x7FA},
    {0x800,0x815},{0x81A,0x81A},{0x824,0x824},{0x828,0x828},{0x840,0x858},{0x860,0x86A},{0x870,0x887},
    {0x889,0x88E},{0x8A0,0x8C9},{0x904,0x939},{0x93D,0x93D},{0x950,0x950},{0x958,0x961},{0x971,0x980},
    {0x985,0x98C},{0x98F,0x990},{0x993,0x9A8},{0x9AA,0x9B0},{0x9B2,0x9B2},{0x9B6,0x9B9},{0x9BD,0x9BD},
    {0x9CE,0x9CE},{0x9DC,0x9DD},{0x9DF,0x9E1},{0x9F0,0x9F1},{0x9FC,0x9FC},{0xA05,0xA0A},{0xA0F,0xA10},
    {0xA13,0xA28},{0xA2A,0xA30},{0xA32,0xA33},{0xA35,0xA36},{0xA38,0xA39},{0xA59,0xA5C},{0xA5E,0xA5E},
    {0xA72,0xA74},{0xA85,0xA8D},{0xA8F,0xA91},{0xA93,0xAA8},{0xAAA,0xAB0},{0xAB2,0xAB3},{0xAB5,0xAB9},
    {0xABD,0xABD},{0xAD0,0xAD0},{0xAE0,0xAE1},{0xAF9,0xAF9},{0xB05,0xB0C},{0xB0F,0xB10},{0xB13,0xB28},
    {0xB2A,0xB30},{0xB32,0xB33},{0xB35,0xB39},{0xB3D,0xB3D},{0xB5C,0xB5D},{0xB5F,0xB61},{0xB71,0xB71},
    {0xB83,0xB83},{0xB85,0xB8A},{0xB8E,0xB90},{0xB92,0xB95},{0xB99,0xB9A},{0xB9C,0xB9C},{0xB9E,0xB9F},
    {0xBA3,0xBA4},{0xBA8,0xBAA},{0xBAE,0xBB9},{0xBD0,0xBD0},{0xC05,0xC0C},{0xC0E,0xC10},{0xC12,0xC28},
    {0xC2A,0xC39},{0xC3D,0xC3D},{0xC58,0xC5A},{0xC5D,0xC5D},{0xC60,0xC61},{0xC80,0xC80},{0xC85,0xC8C},
    {0xC8E,0xC90},{0xC92,0xCA8},{0xCAA,0xCB3},{0xCB5,0xCB9},{0xCBD,0xCBD},{0xCDD,0xCDE},{0xCE0,0xCE1},
    {0xCF1,0xCF2},{0xD04,0xD0C},{0xD0E,0xD10},{0xD12,0xD3A},{0xD3D,0xD3D},{0xD4E,0xD4E},{0xD54,0xD56},
    {0xD5F,0xD61},{0xD7A,0xD7F},{0xD85,0xD96},{0xD9A,0xDB1},{0xDB3,0xDBB},{0xDBD,0xDBD},{0xDC0,0xDC6},
    {0xE01,0xE30},{0xE32,0xE33},{0xE40,0xE46},{0xE81,0xE82},{0xE84,0xE84},{0xE86,0xE8A},{0xE8C,0xEA3},
    {0xEA5,0xEA5},{0xEA7,0xEB0},{0xEB2,0xEB3},{0xEBD,0xEBD},{0xEC0,0xEC4},{0xEC6,0xEC6},{0xEDC,0xEDF},
    {0xF00,0xF00},{0xF40,0xF47},{0xF49,0xF6C},{0xF88,0xF8C},{0x1000,0x102A},{0x103F,0x103F},{0x1050,0x1055},
    {0x105A,0x105D},{0x1061,0x1061},{0x1065,0x1066},{0x106E,0x1070},{0x1075,0x1081},{0x108E,0x108E},
    {0x10A0,0x10C5},{0x10C7,0x10C7},{0x10CD,0x10CD},{0x10D0,0x10FA},{0x10FC,0x1248},{0x124A,0x124D},
    {0x1250,0x1256},{0x1258,0x1258},{0x125A,0x125D},{0x1260,0x1288},{0x128A,0x128D},{0x1290,0x12B0},
    {0x12B2,0x12B5},{0x12B8,0x12BE},{0x12C0,0x12C0},{0x12C2,0x12C5},{0x12C8,0x12D6},{0x12D8,0x1310},
    {0x1312,0x1315},{0x1318,0x135A},{0x1380,0x138F},{0x13A0,0x13F5},{0x13F8,0x13FD},{0x1401,0x166C},
    {0x166F,0x167F},{0x1681,0x169A},{0x16A0,0x16EA},{0x16F1,0x16F8},{0x1700,0x1711},{0x171F,0x1731},
    {0x1740,0x1751},{0x1760,0x176C},{0x176E,0x1770},{0x1780,0x17B3},{0x17D7,0x17D7},{0x17DC,0x17DC},
    {0x1820,0x1878},{0x1880,0x1884},{0x1887,0x18A8},{0x18AA,0x18AA},{0x18B0,0x18F5},{0x1900,0x191E},
    {0x1950,0x196D},{0x1970,0x1974},{0x1980,0x19AB},{0x19B0,0x19C9},{0x1A00,0x1A16},{0x1A20,0x1A54},
    {0x1AA7,0x1AA7},{0x1B05,0x1B33},{0x1B45,0x1B4C},{0x1B83,0x1BA0},{0x1BAE,0x1BAF},{0x1BBA,0x1BE5},
    {0x1C00,0x1C23},{0x1C4D,0x1C4F},{0x1C5A,0x1C7D},{0x1C80,0x1C88},{0x1C90,0x1CBA},{0x1CBD,0x1CBF},
    {0x1CE9,0x1CEC},{0x1CEE,0x1CF3},{0x1CF5,0x1CF6},{0x1CFA,0x1CFA},{0x1D00,0x1DBF},{0x1E00,0x1F15},
    {0x1F18,0x1F1D},{0x1F20,0x1F45},{0x1F48,0x1F4D},{0x1F50,0x1F57},{0x1F59,0x1F59},{0x1F5B,0x1F5B},
    {0x1F5D,0x1F5D},{0x1F5F,0x1F7D},{0x1F80,0x1FB4},{0x1FB6,0x1FBC},{0x1FBE,0x1FBE},{0x1FC2,0x1FC4},
    {0x1FC6,0x1FCC},{0x1FD0,0x1FD3},{0x1FD6,0x1FDB},{0x1FE0,0x1FEC},{0x1FF2,0x1FF4},{0x1FF6,0x1FFC},
    {0x2071,0x2071},{0x207F,0x207F},{0x2090,0x209C},{0x2102,0x2102},{0x2107,0x2107},{0x210A,0x2113},
    {0x2115,0x2115},{0x2119,0x211D},{0x2124,0x2124},{0x2126,0x2126},{0x2128,0x2128},{0x212A,0x212D},
    {0x212F,0x2139},{0x213C,0x213F},{0x2145,0x2149},{0x214E,0x214E},{0x2183,0x2184},{0x2C00,0x2CE4},
    {0x2CEB,0x2CEE},{0x2CF2,0x2CF3},{0x2D00,0x2D25},{0x2D27,0x2D27},{0x2D2D,0x2D2D},{0x2D30,0x2D67},
    {0x2D6F,0x2D6F},{0x2D80,0x2D96},{0x2DA0,0x2DA6},{0x2DA8,0x2DAE},{0x2DB0,0x2DB6},{0x2DB8,0x2DBE},
    {0x2DC0,0x2DC6},{0x2DC8,0x2DCE},{0x2DD0,0x2DD6},{0x2DD8,0x2DDE},{0x2E2F,0x2E2F},{0x3005,0x3006},
    {0x3031,0x3035},{0x303B,0x303C},{0x3041,0x3096},{0x309D,0x309F},{0x30A1,0x30FA},{0x30FC,0x30FF},
    {0x3105,0x312F},{0x3131,0x318E},{0x31A0,0x31BF},{0x31F0,0x31FF},{0x3400,0x4DBF},{0x4E00,0xA48C},
    {0xA4D0,0xA4FD},{0xA500,0xA60C},{0xA610,0xA61F},{0xA62A,0xA62B},{0xA640,0xA66E},{0xA67F,0xA69D},
    {0xA6A0,0xA6E5},{0xA717,0xA71F},{0xA722,0xA788},{0xA78B,0xA7CA},{0xA7D0,0xA7D1},{0xA7D3,0xA7D3},
    {0xA7D5,0xA7D9},{0xA7F2,0xA801},{0xA803,0xA805},{0xA807,0xA80A},{0xA80C,0xA822},{0xA840,0xA873},
    {0xA882,0xA8B3},{0xA8F2,0xA8F7},{0xA8FB,0xA8FB},{0xA8FD,0xA8FE},{0xA90A,0xA925},{0xA930,0xA946},
    {0xA960,0xA97C},{0xA984,0xA9B2},{0xA9CF,0xA9CF},{0xA9E0,0xA9E4},{0xA9E6,0xA9EF},{0xA9FA,0xA9FE},
    {0xAA00,0xAA28},{0xAA40,0xAA42},{0xAA44,0xAA4B},{0xAA60,0xAA76},{0xAA7A,0xAA7A},{0xAA7E,0xAAAF},
    {0xAAB1,0xAAB1},{0xAAB5,0xAAB6},{0xAAB9,0xAABD},{0xAAC0,0xAAC0},{0xAAC2,0xAAC2},{0xAADB,0xAADD},
    {0xAAE0,0xAAEA},{0xAAF2,0xAAF4},{0xAB01,0xAB06},{0xAB09,0xAB0E},{0xAB11,0xAB16},{0xAB20,0xAB26},
    {0xAB28,0xAB2E},{0xAB30,0xAB5A},{0xAB5C,0xAB69},{0xAB70,0xABE2},{0xAC00,0xD7A3},{0xD7B0,0xD7C6},
    {0xD7CB,0xD7FB},{0xF900,0xFA6D},{0xFA70,0xFAD9},{0xFB00,0xFB06},{0xFB13,0xFB17},{0xFB1D,0xFB1D},
    {0xFB1F,0xFB28},{0xFB2A,0xFB36},{0xFB38,0xFB3C},{0xFB3E,0xFB3E},{0xFB40,0xFB41},{0xFB43,0xFB44},
    {0xFB46,0xFBB1},{0xFBD3,0xFD3D},{0xFD50,0xFD8F},{0xFD92,0xFDC7},{0xFDF0,0xFDFB},{0xFE70,0xFE74},
    {0xFE76,0xFEFC},{0xFF21,0xFF3A},{0xFF41,0xFF5A},{0xFF66,0xFFBE},{0xFFC2,0xFFC7},{0xFFCA,0xFFCF},
    {0xFFD2,0xFFD7},{0xFFDA,0xFFDC},{0x10000,0x1000B},{0x1000D,0x10026},{0x10028,0x1003A},{0x1003C,0x1003D},
    {0x1003F,0x1004D},{0x10050,0x1005D},{0x10080,0x100FA},{0x10280,0x1029C},{0x102A0,0x102D0},
    {0x10300,0x1031F},{0x1032D,0x10340},{0x10342,0x10349},{0x10350,0x10375},{0x10380,0x1039D},
    {0x103A0,0x103C3},{0x103C8,0x103CF},{0x10400,0x1049D},{0x104B0,0x104D3},{0x104D8,0x104FB},
    {0x10500,0x10527},{0x10530,0x10563},{0x10570,0x1057A},{0x1057C,0x1058A},{0x1058C,0x10592},
    {0x10594,0x10595},{0x10597,0x105A1},{0x105A3,0x105B1},{0x105B3,0x105B9},{0x105BB,0x105BC},
    {0x10600,0x10736},{0x10740,0x10755},{0x10760,0x10767},{0x10780,0x10785},{0x10787,0x107B0},
    {0x107B2,0x107BA},{0x10800,0x10805},{0x10808,0x10808},{0x1080A,0x10835},{0x10837,0x10838},
    {0x1083C,0x1083C},{0x1083F,0x10855},{0x10860,0x10876},{0x10880,0x1089E},{0x108E0,0x108F2},
    {0x108F4,0x108F5},{0x10900,0x10915},{0x10920,0x10939},{0x10980,0x109B7},{0x109BE,0x109BF},
    {0x10A00,0x10A00},{0x10A10,0x10A13},{0x10A15,0x10A17},{0x10A19,0x10A35},{0x10A60,0x10A7C},
    {0x10A80,0x10A9C},{0x10AC0,0x10AC7},{0x10AC9,0x10AE4},{0x10B00,0x10B35},{0x10B40,0x10B55},
    {0x10B60,0x10B72},{0x10B80,0x10B91},{0x10C00,0x10C48},{0x10C80,0x10CB2},{0x10CC0,0x10CF2},
    {0x10D00,0x10D23},{0x10E80,0x10EA9},{0x10EB0,0x10EB1},{0x10F00,0x10F1C},{0x10F27,0x10F27},
    {0x10F30,0x10F45},{0x10F70,0x10F81},{0x10FB0,0x10FC4},{0x10FE0,0x10FF6},{0x11003,0x11037},
    {0x11071,0x11072},{0x11075,0x11075},{0x11083,0x110AF},{0x110D0,0x110E8},{0x11103,0x11126},
    {0x11144,0x11144},{0x11147,0x11147},{0x11150,0x11172},{0x11176,0x11176},{0x11183,0x111B2},
    {0x111C1,0x111C4},{0x111DA,0x111DA},{0x111DC,0x111DC},{0x11200,0x11211},{0x11213,0x1122B},
    {0x1123F,0x11240},{0x11280,0x11286},{0x11288,0x11288},{0x1128A,0x1128D},{0x1128F,0x1129D},
    {0x1129F,0x112A8},{0x112B0,0x112DE},{0x11305,0x1130C},{0x1130F,0x11310},{0x11313,0x11328},
    {0x1132A,0x11330},{0x11332,0x11333},{0x11335,0x11339},{0x1133D,0x1133D},{0x11350,0x11350},
    {0x1135D,0x11361},{0x11400,0x11434},{0x11447,0x1144A},{0x1145F,0x11461},{0x11480,0x114AF},
    {0x114C4,0x114C5},{0x114C7,0x114C7},{0x11580,0x115AE},{0x115D8,0x115DB},{0x11600,0x1162F},
    {0x11644,0x11644},{0x11680,0x116AA},{0x116B8,0x116B8},{0x11700,0x1171A},{0x11740,0x11746},
    {0x11800,0x1182B},{0x118A0,0x118DF},{0x118FF,0x11906},{0x11909,0x11909},{0x1190C,0x11913},
    {0x11915,0x11916},{0x11918,0x1192F},{0x1193F,0x1193F},{0x11941,0x11941},{0x119A0,0x119A7},
    {0x119AA,0x119D0},{0x119E1,0x119E1},{0x119E3,0x119E3},{0x11A00,0x11A00},{0x11A0B,0x11A32},
    {0x11A3A,0x11A3A},{0x11A50,0x11A50},{0x11A5C,0x11A89},{0x11A9D,0x11A9D},{0x11AB0,0x11AF8},
    {0x11C00,0x11C08},{0x11C0A,0x11C2E},{0x11C40,0x11C40},{0x11C72,0x11C8F},{0x11D00,0x11D06},
    {0x11D08,0x11D09},{0x11D0B,0x11D30},{0x11D46,0x11D46},{0x11D60,0x11D65},{0x11D67,0x11D68},
    {0x11D6A,0x11D89},{0x11D98,0x11D98},{0x11EE0,0x11EF2},{0x11F02,0x11F02},{0x11F04,0x11F10},
    {0x11F12,0x11F33},{0x11FB0,0x11FB0},{0x12000,0x12399},{0x12480,0x12543},{0x12F90,0x12FF0},
    {0x13000,0x1342F},{0x13441,0x13446},{0x14400,0x14646},{0x16800,0x16A38},{0x16A40,0x16A5E},
    {0x16A70,0x16ABE},{0x16AD0,0x16AED},{0x16B00,0x16B2F},{0x16B40,0x16B43},{0x16B63,0x16B77},
    {0x16B7D,0x16B8F},{0x16E40,0x16E7F},{0x16F00,0x16F4A},{0x16F50,0x16F50},{0x16F93,0x16F9F},
    {0x16FE0,0x16FE1},{0x16FE3,0x16FE3},{0x17000,0x187F7},{0x18800,0x18CD5},{0x18D00,0x18D08},
    {0x1AFF0,0x1AFF3},{0x1AFF5,0x1AFFB},{0x1AFFD,0x1AFFE},{0x1B000,0x1B122},{0x1B132,0x1B132},
    {0x1B150,0x1B152},{0x1B155,0x1B155},{0x1B164,0x1B167},{0x1B170,0x1B2FB},{0x1BC00,0x1BC6A},
    {0x1BC70,0x1BC7C},{0x1BC80,0x1BC88},{0x1BC90,0x1BC99},{0x1D400,0x1D454},{0x1D456,0x1D49C},
    {0x1D49E,0x1D49F},{0x1D4A2,0x1D4A2},{0x1D4A5,0x1D4A6},{0x1D4A9,0x1D4AC},{0x1D4AE,0x1D4B9},
    {0x1D4BB,0x1D4BB},{0x1D4BD,0x1D4C3},{0x1D4C5,0x1D505},{0x1D507,0x1D50A},{0x1D50D,0x1D514},
    {0x1D516,0x1D51C},{0x1D51E,0x1D539},{0x1D53B,0x1D53E},{0x1D540,0x1D544},{0x1D546,0x1D546},
    {0x1D54A,0x1D550},{0x1D552,0x1D6A5},{0x1D6A8,0x1D6C0},{0x1D6C2,0x1D6DA},{0x1D6DC,0x1D6FA},
    {0x1D6FC,0x1D714},{0x1D716,0x1D734},{0x1D736,0x1D74E},{0x1D750,0x1D76E},{0x1D770,0x1D788},
    {0x1D78A,0x1D7A8},{0x1D7AA,0x1D7C2},{0x1D7C4,0x1D7CB},{0x1DF00,0x1DF1E},{0x1DF25,0x1DF2A},
    {0x1E030,0x1E06D},{0x1E100,0x1E12C},{0x1E137,0x1E13D},{0x1E14E,0x1E14E},{0x1E290,0x1E2AD},
    {0x1E2C0,0x1E2EB},{0x1E4D0,0x1E4EB},{0x1E7E0,0x1E7E6},{0x1E7E8,0x1E7EB},{0x1E7ED,0x1E7EE},
    {0x1E7F0,0x1E7FE},{0x1E800,0x1E8C4},{0x1E900,0x1E943},{0x1E94B,0x1E94B},{0x1EE00,0x1EE03},
    {0x1EE05,0x1EE1F},{0x1EE21,0x1EE22},{0x1EE24,0x1EE24},{0x1EE27,0x1EE27},{0x1EE29,0x1EE32},
    {0x1EE34,0x1EE37},{0x1EE39,0x1EE39},{0x1EE3B,0x1EE3B},{0x1EE42,0x1EE42},{0x1EE47,0x1EE47},
    {0x1EE49,0x1EE49},{0x1EE4B,0x1EE4B},{0x1EE4D,0x1EE4F},{0x1EE51,0x1EE52},{0x1EE54,0x1EE54},
    {0x1EE57,0x1EE57},{0x1EE59,0x1EE59},{0x1EE5B,0x1EE5B},{0x1EE5D,0x1EE5D},{0x1EE5F,0x1EE5F},
    {0x1EE61,0x1EE62},{0x1EE64,0x1EE64},{0x1EE67,0x1EE6A},{0x1EE6C,0x1EE72},{0x1EE74,0x1EE77},
    {0x1EE79,0x1EE7C},{0x1EE7E,0x1EE7E},{0x1EE80,0x1EE89},{0x1EE8B,0x1EE9B},{0x1EEA1,0x1EEA3},
    {0x1EEA5,0x1EEA9},{0x1EEAB,0x1EEBB},{0x20000,0x2A6DF},{0x2A700,0x2B739},{0x2B740,0x2B81D},
    {0x2B820,0x2CEA1},{0x2CEB0,0x2EBE0},{0x2F800,0x2FA1D},{0x30000,0x3134A},{0x31350,0x323AF}};
static const uint32_t unicode_number[][2] = {
    {0x30,0x39},{0xB2,0xB3},{0xB9,0xB9},{0xBC,0xBE},{0x660,0x669},{0x6F0,0x6F9},{0x7C0,0x7C9},{0x966,0x96F},
    {0x9E6,0x9EF},{0x9F4,0x9F9},{0xA66,0xA6F},{0xAE6,0xAEF},{0xB66,0xB6F},{0xB72,0xB77},{0xBE6,0xBF2},
    {0xC66,0xC6F},{0xC78,0xC7E},{0xCE6,0xCEF},{0xD58,0xD5E},{0xD66,0xD78},{0xDE6,0xDEF},{0xE50,0xE59},
    {0xED0,0xED9},{0xF20,0xF33},{0x1040,0x1049},{0x1090,0x1099},{0x1369,0x137C},{0x16EE,0x16F0},
    {0x17E0,0x17E9},{0x17F0,0x17F9},{0x1810,0x1819},{0x1946,0x194F},{0x19D0,0x19DA},{0x1A80,0x1A89},
    {0x1A90,0x1A99},{0x1B50,0x1B59},{0x1BB0,0x1BB9},{0x1C40,0x1C49},{0x1C50,0x1C59},{0x2070,0x2070},
    {0x2074,0x2079},{0x2080,0x2089},{0x2150,0x2182},{0x2185,0x2189},{0x2460,0x249B},{0x24EA,0x24FF},
    {0x2776,0x2793},{0x2CFD,0x2CFD},{0x3007,0x3007},{0x3021,0x3029},{0x3038,0x303A},{0x3192,0x3195},
    {0x3220,0x3229},{0x3248,0x324F},{0x3251,0x325F},{0x3280,0x3289},{0x32B1,0x32BF},{0xA620,0xA629},
    {0xA6E6,0xA6EF},{0xA830,0xA835},{0xA8D0,0xA8D9},{0xA900,0xA909},{0xA9D0,0xA9D9},{0xA9F0,0xA9F9},
    {0xAA50,0xAA59},{0xABF0,0xABF9},{0xFF10,0xFF19},{0x10107,0x10133},{0x10140,0x10178},{0x1018A,0x1018B},
    {0x102E1,0x102FB},{0x10320,0x10323},{0x10341,0x10341},{0x1034A,0x1034A},{0x103D1,0x103D5},
    {0x104A0,0x104A9},{0x10858,0x1085F},{0x10879,0x1087F},{0x108A7,0x108AF},{0x108FB,0x108FF},
    {0x10916,0x1091B},{0x109BC,0x109BD},{0x109C0,0x109CF},{0x109D2,0x109FF},{0x10A40,0x10A48},
    {0x10A7D,0x10A7E},{0x10A9D,0x10A9F},{0x10AEB,0x10AEF},{0x10B58,0x10B5F},{0x10B78,0x10B7F},
    {0x10BA9,0x10BAF},{0x10CFA,0x10CFF},{0x10D30,0x10D39},{0x10E60,0x10E7E},{0x10F1D,0x10F26},
    {0x10F51,0x10F54},{0x10FC5,0x10FCB},{0x11052,0x1106F},{0x110F0,0x110F9},{0x11136,0x1113F},
    {0x111D0,0x111D9},{0x111E1,0x111F4},{0x112F0,0x112F9},{0x11450,0x11459},{0x114D0,0x114D9},
    {0x11650,0x11659},{0x116C0,0x116C9},{0x11730,0x1173B},{0x118E0,0x118F2},{0x11950,0x11959},
    {0x11C50,0x11C6C},{0x11D50,0x11D59},{0x11DA0,0x11DA9},{0x11F50,0x11F59},{0x11FC0,0x11FD4},
    {0x12400,0x1246E},{0x16A60,0x16A69},{0x16AC0,0x16AC9},{0x16B50,0x16B59},{0x16B5B,0x16B61},
    {0x16E80,0x16E96},{0x1D2C0,0x1D2D3},{0x1D2E0,0x1D2F3},{0x1D360,0x1D378},{0x1D7CE,0x1D7FF},
    {0x1E140,0x1E149},{0x1E2F0,0x1E2F9},{0x1E4F0,0x1E4F9},{0x1E8C7,0x1E8CF},{0x1E950,0x1E959},
    {0x1EC71,0x1ECAB},{0x1ECAD,0x1ECAF},{0x1ECB1,0x1ECB4},{0x1ED01,0x1ED2D},{0x1ED2F,0x1ED3D},
    {0x1F100,0x1F10C},{0x1FBF0,0x1FBF9}};
static const uint32_t unicode_space[][2] = {
    {0x9,0xD},{0x20,0x20},{0x85,0x85},{0xA0,0xA0},{0x1680,0x1680},{0x2000,0x200A},{0x2028,0x2029},
    {0x202F,0x202F},{0x205F,0x205F},{0x3000,0x3000}};
/* END GENERATED UNICODE TABLES */

enum char_class { CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE, CLASS_OTHER };

static bool in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return true;
    }
    return false;
}

#define N_RANGES(t) (sizeof(t) / sizeof((t)[0]))

static int char_class(uint32_t cp) {
    if (cp < 0x80) {  /* ASCII: the common case, without a search */
        if ((cp | 0x20) - 'a' < 26) return CLASS_LETTER;
        if (cp - '0' < 10) return CLASS_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CLASS_SPACE;
        return CLASS_OTHER;
    }
    if (in_ranges(cp, unicode_letter, N_RANGES(unicode_letter))) return CLASS_LETTER;
    if (in_ranges(cp, unicode_number, N_RANGES(unicode_number))) return CLASS_NUMBER;
    if (in_ranges(cp, unicode_space, N_RANGES(unicode_space))) return CLASS_SPACE;
    return CLASS_OTHER;
}

/* ============================================================================================
 * UTF-8
 * ============================================================================================ */

/* Length of the valid UTF-8 prefix at s (at most n bytes) and whether it is a whole character:
 * returns k >= 1 with *complete set, or k == 0 when s[0] cannot start a character.
 * The ranges are Unicode's table 3-7 (no overlongs, no surrogates, nothing past U+10FFFF). */
static size_t utf8_prefix(const uint8_t *s, size_t n, bool *complete, uint32_t *cp) {
    uint8_t b = s[0];
    *complete = false;
    if (b < 0x80) { *complete = true; *cp = b; return 1; }
    int len = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (len == 0) return 0;
    uint8_t lo = 0x80, hi = 0xBF;           /* the second byte's range depends on the first */
    if (b == 0xE0) lo = 0xA0;
    else if (b == 0xED) hi = 0x9F;
    else if (b == 0xF0) lo = 0x90;
    else if (b == 0xF4) hi = 0x8F;
    uint32_t c = b & (0xFF >> (len + 1));
    size_t k = 1;
    for (; k < (size_t)len && k < n; k++) {
        uint8_t ok_lo = k == 1 ? lo : 0x80, ok_hi = k == 1 ? hi : 0xBF;
        if (s[k] < ok_lo || s[k] > ok_hi) return k;
        c = (c << 6) | (s[k] & 0x3F);
    }
    if (k == (size_t)len) { *complete = true; *cp = c; }
    return k;
}

/* Streaming printer: passes whole characters through, holds back a character that has not yet
 * arrived whole, and writes U+FFFD for bytes that cannot be completed (as Rust's
 * String::from_utf8_lossy and Python's errors="replace" do). */
typedef struct {
    uint8_t pending[4];
    size_t n;
} Utf8Stream;

static const uint8_t REPLACEMENT[3] = {0xEF, 0xBF, 0xBD};

static void utf8_emit(Utf8Stream *st, FILE *out, bool final) {
    size_t at = 0;
    while (at < st->n) {
        bool complete;
        uint32_t cp;
        size_t k = utf8_prefix(st->pending + at, st->n - at, &complete, &cp);
        if (complete) { fwrite(st->pending + at, 1, k, out); at += k; continue; }
        if (k > 0 && at + k == st->n && !final) break;  /* may still complete: wait */
        fwrite(REPLACEMENT, 1, 3, out);
        at += k ? k : 1;
    }
    memmove(st->pending, st->pending + at, st->n - at);
    st->n -= at;
}

void utf8_stream_put(Utf8Stream *st, const uint8_t *bytes, size_t n, FILE *out) {
    for (size_t i = 0; i < n; i++) {
        st->pending[st->n++] = bytes[i];
        if (st->n == sizeof st->pending || bytes[i] < 0x80) utf8_emit(st, out, false);
    }
    utf8_emit(st, out, false);
}

void utf8_stream_flush(Utf8Stream *st, FILE *out) {
    utf8_emit(st, out, true);
    fflush(out);
}

/* ============================================================================================
 * The tokenizer: vocabulary and merges from the model file's tokenizer block (model.h)
 * ============================================================================================ */

typedef struct {
    uint32_t n_vocab;
    const uint8_t **token;      /* [n_vocab] each token's bytes, pointing into the model file */
    uint32_t *token_len;        /* [n_vocab] */
    uint8_t *token_kind;        /* [n_vocab] enum mm_token_kind */
    int byte_token[256];        /* the token of each single byte */
    int *added;                 /* [n_added] ids of added tokens, longest content first */
    int n_added;
    bool added_first[256];      /* bytes an added token can start with */
    uint64_t *merge_key;        /* open addressing: (left << 32 | right) + 1; 0 = empty slot */
    uint32_t *merge_rank;       /* rank of that merge */
    uint32_t *merge_result;     /* the merged token */
    uint32_t merge_mask;        /* table size - 1 (a power of two) */
} Tokenizer;

static uint32_t merge_slot(const Tokenizer *t, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) & t->merge_mask;
}

/* the merge of the pair (left, right): its rank, or UINT32_MAX when there is none */
static uint32_t merge_lookup(const Tokenizer *t, uint32_t left, uint32_t right, uint32_t *result) {
    uint64_t key = ((uint64_t)left << 32 | right) + 1;
    for (uint32_t i = merge_slot(t, key);; i = (i + 1) & t->merge_mask) {
        if (t->merge_key[i] == 0) return UINT32_MAX;
        if (t->merge_key[i] == key) { *result = t->merge_result[i]; return t->merge_rank[i]; }
    }
}

/* added tokens longest first, so the first match is the longest (leftmost-longest matching) */
static void sort_added(Tokenizer *t) {
    for (int i = 1; i < t->n_added; i++) {
        int id = t->added[i], j = i;
        for (; j > 0 && t->token_len[t->added[j - 1]] < t->token_len[id]; j--) t->added[j] = t->added[j - 1];
        t->added[j] = id;
    }
}

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void tokenizer_free(Tokenizer *t) {
    free(t->token); free(t->token_len); free(t->token_kind); free(t->added);
    free(t->merge_key); free(t->merge_rank); free(t->merge_result);
    memset(t, 0, sizeof *t);
}

/* Parse and check the tokenizer block. Returns NULL, or a message naming what is wrong. */
const char *tokenizer_load(Tokenizer *t, const uint8_t *block, uint64_t size, uint32_t vocab_size) {
    static char err[160];
    memset(t, 0, sizeof *t);
#define FAIL(...) do { snprintf(err, sizeof err, __VA_ARGS__); tokenizer_free(t); return err; } while (0)
    if (size < 8) FAIL("tokenizer block is %llu bytes, too short", (unsigned long long)size);
    uint32_t n_vocab = read_u32(block), n_merges = read_u32(block + 4);
    if (n_vocab != vocab_size) FAIL("tokenizer has %u tokens, the model's vocab is %u", n_vocab, vocab_size);
    if (n_merges > (1u << 24)) FAIL("tokenizer has %u merges, more than 16777216", n_merges);
    t->n_vocab = n_vocab;
    t->token = calloc(n_vocab, sizeof *t->token);
    t->token_len = calloc(n_vocab, sizeof *t->token_len);
    t->token_kind = calloc(n_vocab, 1);
    t->added = calloc(n_vocab, sizeof *t->added);
    if (!t->token || !t->token_len || !t->token_kind || !t->added)
        FAIL("out of memory loading the tokenizer");
    for (int b = 0; b < 256; b++) t->byte_token[b] = -1;
    uint64_t at = 8;
    for (uint32_t i = 0; i < n_vocab; i++) {
        if (size - at < 5) FAIL("tokenizer block ends inside token %u", i);
        uint8_t kind = block[at];
        uint32_t len = read_u32(block + at + 1);
        at += 5;
        if (kind > MM_TOKEN_SPECIAL) FAIL("token %u has kind %u, expected 0..2", i, kind);
        if (len > size - at) FAIL("token %u (%u bytes) runs past the tokenizer block", i, len);
        t->token[i] = block + at;
        t->token_len[i] = len;
        t->token_kind[i] = kind;
        at += len;
        if (kind != MM_TOKEN_NORMAL) {
            if (len == 0) FAIL("added token %u is empty", i);
            t->added[t->n_added++] = (int)i;
            t->added_first[t->token[i][0]] = true;
        } else if (len == 1 && t->byte_token[t->token[i][0]] < 0) {
            t->byte_token[t->token[i][0]] = (int)i;
        }
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_token[b] < 0) FAIL("tokenizer has no token for the byte 0x%02x", b);
    sort_added(t);
    if ((uint64_t)n_merges * 12 > size - at) FAIL("tokenizer block ends inside its %u merges", n_merges);
    uint32_t cap = 16;
    while (cap < 2 * n_merges) cap *= 2;
    t->merge_mask = cap - 1;
    t->merge_key = calloc(cap, sizeof *t->merge_key);
    t->merge_rank = calloc(cap, sizeof *t->merge_rank);
    t->merge_result = calloc(cap, sizeof *t->merge_result);
    if (!t->merge_key || !t->merge_rank || !t->merge_result) FAIL("out of memory loading the merges");
    for (uint32_t r = 0; r < n_merges; r++, at += 12) {
        uint32_t left = read_u32(block + at), right = read_u32(block + at + 4),
                 merged = read_u32(block + at + 8);
        if (left >= n_vocab || right >= n_vocab || merged >= n_vocab)
            FAIL("merge %u (%u + %u -> %u) names a token outside the vocab of %u", r, left, right, merged,
                 n_vocab);
        uint64_t key = ((uint64_t)left << 32 | right) + 1;
        uint32_t i = merge_slot(t, key);
        while (t->merge_key[i] != 0 && t->merge_key[i] != key) i = (i + 1) & t->merge_mask;
        if (t->merge_key[i] == key) continue;  /* a repeated pair keeps its first (lowest) rank */
        t->merge_key[i] = key;
        t->merge_rank[i] = r;
        t->merge_result[i] = merged;
    }
    return NULL;
#undef FAIL
}

const uint8_t *tokenizer_decode(const Tokenizer *t, int id, size_t *len) {
    *len = t->token_len[id];
    return t->token[id];
}

/* ============================================================================================
 * Encoding
 * ============================================================================================ */

typedef struct { uint32_t rank; uint32_t pos; } Candidate;   /* a pair that could merge */

static bool cand_less(Candidate a, Candidate b) {
    return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos;
}

static void heap_push(Candidate *h, size_t *n, Candidate c) {
    size_t i = (*n)++;
    while (i > 0 && cand_less(c, h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = c;
}

static Candidate heap_pop(Candidate *h, size_t *n) {
    Candidate top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(h[c + 1], h[c])) c++;
        if (!cand_less(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

/* Scratch for one encode call, sized for the whole text: symbols of the piece being merged. */
typedef struct {
    uint32_t *id;               /* token of each symbol */
    int32_t *prev, *next;       /* linked list of live symbols; -1 ends it */
    bool *dead;
    Candidate *heap;
    size_t heap_cap;
} BpeScratch;

static void push_pair(const Tokenizer *t, BpeScratch *w, size_t *heap_n, int32_t pos) {
    uint32_t merged;
    int32_t nx = w->next[pos];
    if (nx < 0) return;
    uint32_t rank = merge_lookup(t, w->id[pos], w->id[nx], &merged);
    if (rank != UINT32_MAX && *heap_n < w->heap_cap)
        heap_push(w->heap, heap_n, (Candidate){rank, (uint32_t)pos});
}

/* BPE on one pre-split piece; appends its tokens to ids. Lowest rank merges first. */
static size_t bpe_piece(const Tokenizer *t, BpeScratch *w, const uint8_t *s, size_t n, int *ids) {
    size_t heap_n = 0;
    for (size_t i = 0; i < n; i++) {
        w->id[i] = (uint32_t)t->byte_token[s[i]];
        w->prev[i] = (int32_t)i - 1;
        w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        w->dead[i] = false;
    }
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, w, &heap_n, (int32_t)i);
    while (heap_n > 0) {
        Candidate c = heap_pop(w->heap, &heap_n);
        int32_t pos = (int32_t)c.pos, nx = w->next[pos];
        uint32_t merged = 0;
        /* skip stale entries: the symbol or its neighbour changed since this pair was queued */
        if (w->dead[pos] || nx < 0 || merge_lookup(t, w->id[pos], w->id[nx], &merged) != c.rank) continue;
        w->id[pos] = merged;
        w->dead[nx] = true;
        w->next[pos] = w->next[nx];
        if (w->next[nx] >= 0) w->prev[w->next[nx]] = pos;
        if (w->prev[pos] >= 0) push_pair(t, w, &heap_n, w->prev[pos]);
        push_pair(t, w, &heap_n, pos);
    }
    size_t count = 0;
    for (int32_t i = 0; i >= 0; i = w->next[i]) ids[count++] = (int)w->id[i];
    return count;
}

/* A character of the text: its byte length and class (invalid UTF-8: one byte, CLASS_OTHER). */
static size_t next_char(const uint8_t *s, size_t n, int *cls, bool *is_space_0x20) {
    bool complete;
    uint32_t cp = 0;
    size_t k = utf8_prefix(s, n, &complete, &cp);
    *is_space_0x20 = s[0] == ' ';
    if (!complete) { *cls = CLASS_OTHER; return 1; }
    *cls = char_class(cp);
    return k;
}

/* The length of the pre-split piece at the start of s, following the GPT-2 pattern's alternatives
 * in order: contractions, ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`, `\s+(?!\S)`, `\s+`. */
static size_t piece_length(const uint8_t *s, size_t n) {
    if (s[0] == '\'' && n >= 2) {
        if (s[1] == 's' || s[1] == 't' || s[1] == 'm' || s[1] == 'd') return 2;
        if (n >= 3 &&
            ((s[1] == 'r' && s[2] == 'e') || (s[1] == 'v' && s[2] == 'e') || (s[1] == 'l' && s[2] == 'l')))
            return 3;
    }
    int cls, next_cls;
    bool space, next_space;
    size_t k = next_char(s, n, &cls, &space);
    size_t start = 0;
    if (space && k < n) {  /* ` ?X+`: a single U+0020 may lead a run of letters/numbers/others */
        next_char(s + k, n - k, &next_cls, &next_space);
        if (next_cls != CLASS_SPACE) { start = k; cls = next_cls; }
    }
    if (cls != CLASS_SPACE) {
        size_t at = start;
        while (at < n) {
            int c;
            bool sp;
            size_t len = next_char(s + at, n - at, &c, &sp);
            if (c != cls) break;
            at += len;
        }
        return at;
    }
    /* a run of whitespace: all of it at the end of the text or before more whitespace; before a
     * non-space character, all but its last character (which then leads the next piece) */
    size_t at = 0, last = 0;
    while (at < n) {
        int c;
        bool sp;
        size_t len = next_char(s + at, n - at, &c, &sp);
        if (c != CLASS_SPACE) break;
        last = at;
        at += len;
    }
    if (at < n && last > 0) return last;
    return at;
}

/* Token ids of text[0..len). ids must have room for len entries (a token covers >= 1 byte).
 * Returns the count, or (size_t)-1 when out of memory. */
size_t tokenizer_encode(const Tokenizer *t, const uint8_t *text, size_t len, int *ids) {
    if (len == 0) return 0;
    BpeScratch w = {.id = malloc(len * sizeof(uint32_t)), .prev = malloc(len * sizeof(int32_t)),
                    .next = malloc(len * sizeof(int32_t)), .dead = malloc(len),
                    .heap = malloc(3 * len * sizeof(Candidate)), .heap_cap = 3 * len};
    size_t count = (size_t)-1;
    if (!w.id || !w.prev || !w.next || !w.dead || !w.heap) goto done;
    count = 0;
    size_t segment = 0, at = 0;
    while (at <= len) {
        /* 1. an added token here? the longest one that matches (they are sorted longest first) */
        int found = -1;
        if (at < len && t->added_first[text[at]])
            for (int i = 0; i < t->n_added; i++) {
                uint32_t tl = t->token_len[t->added[i]];
                if (tl <= len - at && memcmp(text + at, t->token[t->added[i]], tl) == 0) {
                    found = t->added[i];
                    break;
                }
            }
        if (found < 0 && at < len) { at++; continue; }
        /* 2-3. the text before it: pre-split, then BPE each piece */
        for (size_t p = segment; p < at;) {
            size_t plen = piece_length(text + p, at - p);
            count += bpe_piece(t, &w, text + p, plen, ids + count);
            p += plen;
        }
        if (found < 0) break;
        ids[count++] = found;
        at += t->token_len[found];
        segment = at;
    }
done:
    free(w.id); free(w.prev); free(w.next); free(w.dead); free(w.heap);
    return count;
}

/* ============================================================================================
 * Chat templates: what each checkpoint's tokenizer_config.json chat_template renders
 * ============================================================================================ */

/* a tool call of an assistant turn */
typedef struct {
    char *name;                 /* the function's name */
    char *arguments;            /* its arguments as the template prints them: given as a string,
                                   that string; given as JSON, that JSON as Jinja's tojson writes it */
} ChatToolCall;

/* one message of a conversation (OpenAI's messages format) */
typedef struct {
    const char *role;           /* "system", "user", "assistant" or "tool" */
    const char *content;        /* its text; NULL when null or not given (the template prints "") */
    const char *reasoning;      /* assistant: reasoning_content; NULL when not given */
    ChatToolCall *tool_calls;   /* assistant: the calls it made, [n_tool_calls] */
    int n_tool_calls;
} ChatMessage;

typedef struct { char *s; size_t len, cap; bool oom; } Str;

static void str_add(Str *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *p = realloc(b->s, cap);
        if (!p) { b->oom = true; return; }
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void str_cat(Str *b, const char *s) { str_add(b, s, strlen(s)); }

/* [s, e) without leading / trailing newlines (Jinja's lstrip('\n'), rstrip('\n')) */
static void strip_newlines(const char **s, const char **e, bool left, bool right) {
    while (left && *s < *e && **s == '\n') (*s)++;
    while (right && *e > *s && (*e)[-1] == '\n') (*e)--;
}

/* the last occurrence of needle in [s, e), or NULL */
static const char *find_last(const char *s, const char *e, const char *needle) {
    size_t n = strlen(needle), len = (size_t)(e - s);
    for (size_t i = len >= n ? len - n + 1 : 0; i-- > 0;)
        if (memcmp(s + i, needle, n) == 0) return s + i;
    return NULL;
}

/* ============================================================================================
 * Conversations and tools in JSON (OpenAI's format), read as JSON.parse reads them
 * ============================================================================================ */

typedef struct Json Json;
struct Json {
    enum { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } type;
    double number;
    char *string;               /* JSON_STRING: UTF-8, NUL-terminated (a \u0000 is refused) */
    Json *items;                /* JSON_ARRAY: [n]; JSON_OBJECT: the values, [n] */
    char **keys;                /* JSON_OBJECT: the keys, [n], in first-seen order (a repeated key
                                   keeps its first place and its last value, as JSON.parse does) */
    int n;
};

typedef struct {
    const char *s, *at, *end;
    char error[160];
} JsonParser;

enum { JSON_MAX_DEPTH = 200 };

static bool json_fail(JsonParser *p, const char *what) {
    if (p->error[0]) return false;
    int line = 1, column = 1;
    for (const char *c = p->s; c < p->at; c++) {
        if (*c == '\n') line++, column = 1;
        else if (((unsigned char)*c & 0xC0) != 0x80) column++;
    }
    snprintf(p->error, sizeof p->error, "JSON at line %d, column %d: %s", line, column, what);
    return false;
}

static void json_skip_space(JsonParser *p) {
    while (p->at < p->end && (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r')) p->at++;
}

static int hex_digit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static bool json_u16(JsonParser *p, uint32_t *u) {  /* the XXXX of \uXXXX */
    *u = 0;
    for (int i = 0; i < 4; i++) {
        int d = p->at < p->end ? hex_digit(*p->at) : -1;
        if (d < 0) return json_fail(p, "\\u needs four hex digits");
        *u = *u << 4 | (uint32_t)d;
        p->at++;
    }
    return true;
}

static bool json_string(JsonParser *p, char **out) {
    Str b = {0};
    str_add(&b, "", 0);
    p->at++;  /* the opening quote */
    for (;;) {
        if (p->at >= p->end) { free(b.s); return json_fail(p, "a string is not closed"); }
        unsigned char c = (unsigned char)*p->at;
        if (c == '"') break;
        if (c < 0x20) { free(b.s); return json_fail(p, "a control character inside a string (write it as \\n, \\t or \\u00XX)"); }
        if (c != '\\') {
            bool complete;
            uint32_t cp;
            size_t k = utf8_prefix((const uint8_t *)p->at, (size_t)(p->end - p->at), &complete, &cp);
            if (!complete) { free(b.s); return json_fail(p, "text that is not UTF-8"); }
            str_add(&b, p->at, k);
            p->at += k;
            continue;
        }
        p->at++;
        char e = p->at < p->end ? *p->at++ : 0;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            str_add(&b, &"\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"], 1);
            continue;
        }
        uint32_t u, low;
        if (e != 'u') { free(b.s); return json_fail(p, "an unknown escape in a string"); }
        if (!json_u16(p, &u)) { free(b.s); return false; }
        if (u >= 0xD800 && u < 0xDC00) {  /* a surrogate pair: \uD8xx\uDCxx */
            if (p->end - p->at < 2 || p->at[0] != '\\' || p->at[1] != 'u') { free(b.s); return json_fail(p, "a lone surrogate \\u escape"); }
            p->at += 2;
            if (!json_u16(p, &low)) { free(b.s); return false; }
            if (low < 0xDC00 || low >= 0xE000) { free(b.s); return json_fail(p, "a lone surrogate \\u escape"); }
            u = 0x10000 + ((u - 0xD800) << 10) + (low - 0xDC00);
        } else if (u >= 0xDC00 && u < 0xE000) {
            free(b.s);
            return json_fail(p, "a lone surrogate \\u escape");
        }
        if (u == 0) { free(b.s); return json_fail(p, "a \\u0000 in a string (text may not hold NUL)"); }
        char utf8[4];
        int k = u < 0x80 ? 1 : u < 0x800 ? 2 : u < 0x10000 ? 3 : 4;
        if (k == 1) utf8[0] = (char)u;
        else {
            for (int i = k - 1; i > 0; i--, u >>= 6) utf8[i] = (char)(0x80 | (u & 0x3F));
            utf8[0] = (char)((0xF0 << (4 - k)) | u);
        }
        str_add(&b, utf8, (size_t)k);
    }
    p->at++;  /* the closing quote */
    if (b.oom) { free(b.s); return json_fail(p, "out of memory"); }
    *out = b.s;
    return true;
}

static bool json_number_text(JsonParser *p, double *x) {  /* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
    const char *s = p->at, *c = s;
    #define DIGITS(c) ((c) < p->end && *(c) >= '0' && *(c) <= '9')
    if (c < p->end && *c == '-') c++;
    if (!DIGITS(c)) return json_fail(p, "a number needs digits");
    if (*c == '0') c++;
    else while (DIGITS(c)) c++;
    if (c < p->end && *c == '.') {
        if (!DIGITS(c + 1)) return json_fail(p, "a number needs digits after its point");
        for (c++; DIGITS(c); c++) {}
    }
    if (c < p->end && (*c == 'e' || *c == 'E')) {
        c++;
        if (c < p->end && (*c == '+' || *c == '-')) c++;
        if (!DIGITS(c)) return json_fail(p, "a number needs digits in its exponent");
        while (DIGITS(c)) c++;
    }
    #undef DIGITS
    char buf[64];
    if (c - s >= (long)sizeof buf) return json_fail(p, "a number of more than 63 characters");
    memcpy(buf, s, (size_t)(c - s));
    buf[c - s] = 0;
    *x = strtod(buf, NULL);
    if (!isfinite(*x)) return json_fail(p, "a number beyond a double's range");
    p->at = c;
    return true;
}

static void json_free(Json *v) {
    if (v->type == JSON_STRING) free(v->string);
    for (int i = 0; i < v->n; i++) {
        json_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    *v = (Json){0};
}

static bool json_value(JsonParser *p, Json *v, int depth);

/* the items of an array, or the members of an object: [ v, v ] or { "k": v, "k": v } */
static bool json_members(JsonParser *p, Json *v, int depth, bool object) {
    char close = object ? '}' : ']';
    p->at++;
    json_skip_space(p);
    if (p->at < p->end && *p->at == close) { p->at++; return true; }
    int cap = 0;
    for (;;) {
        json_skip_space(p);
        char *key = NULL;
        if (object) {
            if (p->at >= p->end || *p->at != '"') return json_fail(p, "expected a key in quotes");
            if (!json_string(p, &key)) return false;
            json_skip_space(p);
            if (p->at >= p->end || *p->at != ':') { free(key); return json_fail(p, "expected ':' after a key"); }
            p->at++;
        }
        Json item = {0};
        if (!json_value(p, &item, depth + 1)) { json_free(&item); free(key); return false; }
        int at = v->n;
        for (int i = 0; object && i < v->n; i++)
            if (!strcmp(v->keys[i], key)) at = i;
        if (at < v->n) {  /* a repeated key: the last value, in the first place */
            json_free(&v->items[at]);
            v->items[at] = item;
            free(key);
        } else {
            if (v->n == cap) {
                cap = cap ? 2 * cap : 4;
                Json *items = realloc(v->items, sizeof *items * (size_t)cap);
                if (items) v->items = items;
                char **keys = object ? realloc(v->keys, sizeof *keys * (size_t)cap) : NULL;
                if (keys) v->keys = keys;
                if (!items || (object && !keys)) { json_free(&item); free(key); return json_fail(p, "out of memory"); }
            }
            v->items[v->n] = item;
            if (object) v->keys[v->n] = key;
            v->n++;
        }
        json_skip_space(p);
        if (p->at < p->end && *p->at == ',') { p->at++; continue; }
        if (p->at < p->end && *p->at == close) { p->at++; return true; }
        return json_fail(p, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static bool json_value(JsonParser *p, Json *v, int depth) {
    json_skip_space(p);
    if (depth > JSON_MAX_DEPTH) return json_fail(p, "nested more than 200 deep");
    if (p->at >= p->end) return json_fail(p, "the text ends where a value was expected");
    char c = *p->at;
    size_t left = (size_t)(p->end - p->at);
    if (c == '{' || c == '[') {
        v->type = c == '{' ? JSON_OBJECT : JSON_ARRAY;
        return json_members(p, v, depth, c == '{');
    }
    if (c == '"') {
        v->type = JSON_STRING;
        return json_string(p, &v->string);
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        v->type = JSON_NUMBER;
        return json_number_text(p, &v->number);
    }
    static const struct { const char *word; int type; } words[] = {
        {"null", JSON_NULL}, {"true", JSON_TRUE}, {"false", JSON_FALSE}};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i].word);
        if (left >= n && !memcmp(p->at, words[i].word, n)) {
            v->type = words[i].type;
            p->at += n;
            return true;
        }
    }
    return json_fail(p, "expected a value: an object, array, string, number, true, false or null");
}

/* a whole JSON text; on failure, the problem in p->error */
static bool json_parse(JsonParser *p, const char *text, size_t len, Json *v) {
    *p = (JsonParser){.s = text, .at = text, .end = text + len};
    *v = (Json){0};
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) p->at += 3;  /* a byte order mark */
    bool ok = json_value(p, v, 0);
    json_skip_space(p);
    if (ok && p->at < p->end) ok = json_fail(p, "more text after the JSON value");
    if (!ok) json_free(v);
    return ok;
}

static const Json *json_get(const Json *object, const char *key) {
    for (int i = 0; object->type == JSON_OBJECT && i < object->n; i++)
        if (!strcmp(object->keys[i], key)) return &object->items[i];
    return NULL;
}

/* A number as JavaScript writes it (what @huggingface/jinja's tojson prints): the shortest digits
 * that read back to the same double; 1e21 and up, and below 1e-6, with an exponent. */
static void json_write_number(Str *b, double x) {
    if (x == 0) { str_cat(b, "0"); return; }  /* -0 too */
    char e[40], digits[24], out[48];
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(e, sizeof e, "%.*e", precision - 1, x);
        if (strtod(e, NULL) == x) break;
    }
    int k = 0, o = 0;  /* e is [-]d[.ddd]e[+-]dd: the digits, then where the point goes */
    const char *c = e;
    if (*c == '-') out[o++] = *c++;
    for (; *c != 'e'; c++)
        if (*c != '.') digits[k++] = *c;
    int point = atoi(c + 1) + 1;
    while (k > 1 && digits[k - 1] == '0') k--;
    if (k <= point && point <= 21) {  /* an integer: 123000 */
        for (int i = 0; i < point; i++) out[o++] = i < k ? digits[i] : '0';
    } else if (0 < point && point <= 21) {  /* 12.5 */
        for (int i = 0; i < k; i++) {
            if (i == point) out[o++] = '.';
            out[o++] = digits[i];
        }
    } else if (-6 < point && point <= 0) {  /* 0.00125 */
        out[o++] = '0', out[o++] = '.';
        for (int i = 0; i < -point; i++) out[o++] = '0';
        for (int i = 0; i < k; i++) out[o++] = digits[i];
    } else {  /* 1.25e+21, 1e-7 */
        out[o++] = digits[0];
        if (k > 1) out[o++] = '.';
        for (int i = 1; i < k; i++) out[o++] = digits[i];
        o += snprintf(out + o, sizeof out - (size_t)o, "e%c%d", point - 1 >= 0 ? '+' : '-', abs(point - 1));
    }
    str_add(b, out, (size_t)o);
}

static void json_write_string(Str *b, const char *s) {  /* JSON.stringify's escapes; all else as is */
    str_cat(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\b' ? "\\b" : c == '\f' ? "\\f"
                        : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
        char u[8];
        if (!esc && c < 0x20) snprintf(u, sizeof u, "\\u%04x", c), esc = u;
        if (esc) str_cat(b, esc);
        else str_add(b, s, 1);
    }
    str_cat(b, "\"");
}

/* Jinja's `value | tojson` as @huggingface/jinja (and transformers' json.dumps) writes it: ", "
 * between items and ": " after keys, keys in their order, no indentation */
static void json_write(Str *b, const Json *v) {
    switch (v->type) {
    case JSON_NULL: str_cat(b, "null"); break;
    case JSON_FALSE: str_cat(b, "false"); break;
    case JSON_TRUE: str_cat(b, "true"); break;
    case JSON_NUMBER: json_write_number(b, v->number); break;
    case JSON_STRING: json_write_string(b, v->string); break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        str_cat(b, v->type == JSON_ARRAY ? "[" : "{");
        for (int i = 0; i < v->n; i++) {
            if (i) str_cat(b, ", ");
            if (v->type == JSON_OBJECT) {
                json_write_string(b, v->keys[i]);
                str_cat(b, ": ");
            }
            json_write(b, &v->items[i]);
        }
        str_cat(b, v->type == JSON_ARRAY ? "]" : "}");
    }
}

static char *json_text(const Json *v) {
    Str b = {0};
    str_add(&b, "", 0);
    json_write(&b, v);
    if (b.oom) { free(b.s); return NULL; }
    return b.s;
}

static char *chat_strdup(const char *s) {
    char *d = strdup(s);
    if (!d) { fputs("error: out of memory reading a conversation\n", stderr); exit(1); }
    return d;
}

void chat_message_free(ChatMessage *m) {
    free((char *)m->content);
    free((char *)m->reasoning);
    for (int i = 0; i < m->n_tool_calls; i++) {
        free(m->tool_calls[i].name);
        free(m->tool_calls[i].arguments);
    }
    free(m->tool_calls);
    *m = (ChatMessage){0};
}

static char chat_error[256];

static const char *chat_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *chat_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(chat_error, sizeof chat_error, fmt, ap);
    va_end(ap);
    return chat_error;
}

/* one message object as the template reads it; i counts from 1 for the errors */
static const char *chat_message(const Json *j, int i, ChatMessage *m) {
    static const char *roles[] = {"system", "user", "assistant", "tool"};
    *m = (ChatMessage){0};
    if (j->type != JSON_OBJECT) return chat_fail("message %d is not an object", i);
    const Json *role = json_get(j, "role"), *content = json_get(j, "content");
    if (!role || role->type != JSON_STRING) return chat_fail("message %d has no \"role\" string", i);
    for (int r = 0; r < 4; r++)
        if (!strcmp(role->string, roles[r])) m->role = roles[r];
    if (!m->role) return chat_fail("message %d: role \"%.40s\" is not system, user, assistant or tool", i, role->string);
    /* the template prints a string content and nothing for null; parts (a list) it cannot print */
    if (content && content->type != JSON_STRING && content->type != JSON_NULL)
        return chat_fail("message %d: \"content\" is neither a string nor null (lists of parts are not read)", i);
    if (content && content->type == JSON_STRING) m->content = chat_strdup(content->string);
    const Json *reasoning = json_get(j, "reasoning_content"), *calls = json_get(j, "tool_calls");
    if (reasoning && reasoning->type == JSON_STRING && m->role == roles[2])
        m->reasoning = chat_strdup(reasoning->string);
    if (!calls || calls->type == JSON_NULL || (calls->type == JSON_ARRAY && calls->n == 0)) return NULL;
    if (m->role != roles[2]) return chat_fail("message %d: only an assistant's message has tool_calls", i);
    if (calls->type != JSON_ARRAY) return chat_fail("message %d: \"tool_calls\" is not a list", i);
    m->tool_calls = calloc((size_t)calls->n, sizeof *m->tool_calls);
    if (!m->tool_calls) return chat_fail("out of memory");
    for (int c = 0; c < calls->n; c++) {
        const Json *call = &calls->items[c], *fn = json_get(call, "function");
        if (call->type != JSON_OBJECT) return chat_fail("message %d: tool call %d is not an object", i, c + 1);
        if (fn && fn->type == JSON_OBJECT && fn->n) call = fn;  /* {"type": "function", "function": {...}} */
        const Json *name = json_get(call, "name"), *args = json_get(call, "arguments");
        if (!name || name->type != JSON_STRING)
            return chat_fail("message %d: tool call %d has no function \"name\" string", i, c + 1);
        if (!args) return chat_fail("message %d: tool call %d has no \"arguments\"", i, c + 1);
        ChatToolCall *tc = &m->tool_calls[m->n_tool_calls++];
        tc->name = chat_strdup(name->string);
        tc->arguments = args->type == JSON_STRING ? chat_strdup(args->string) : json_text(args);
        if (!tc->arguments) return chat_fail("out of memory");
    }
    return NULL;
}

/* a list of tools (OpenAI's {"type": "function", "function": {...}} objects), each as its tojson text */
static const char *chat_tools(const Json *list, char ***tools, int *n_tools) {
    if (list->type != JSON_ARRAY) return chat_fail("\"tools\" is not a list");
    *tools = calloc((size_t)list->n + 1, sizeof **tools);
    if (!*tools) return chat_fail("out of memory");
    for (int i = 0; i < list->n; i++) {
        if (list->items[i].type != JSON_OBJECT) return chat_fail("tool %d is not an object", i + 1);
        if (!((*tools)[(*n_tools)++] = json_text(&list->items[i]))) return chat_fail("out of memory");
    }
    return NULL;
}

/* A conversation: a JSON list of messages, or an object with "messages" (a request body, whose
 * "tools" are read too when tools is not NULL). NULL on success, else what is wrong; either way
 * the *n messages read are the caller's to free (chat_message_free, then free). */
const char *chat_parse_messages(const char *text, size_t len, ChatMessage **msgs, int *n,
                                char ***tools, int *n_tools) {
    JsonParser p;
    Json doc;
    *msgs = NULL, *n = 0;
    if (!json_parse(&p, text, len, &doc)) return chat_fail("%s", p.error);
    const Json *list = doc.type == JSON_OBJECT ? json_get(&doc, "messages") : &doc;
    const char *err = NULL;
    if (!list || list->type != JSON_ARRAY)
        err = chat_fail("expected a list of messages, or an object with \"messages\"");
    else if (list->n == 0)
        err = chat_fail("the list of messages is empty");
    else if (!(*msgs = calloc((size_t)list->n, sizeof **msgs)))
        err = chat_fail("out of memory");
    for (int i = 0; !err && i < list->n; i++) {
        err = chat_message(&list->items[i], i + 1, &(*msgs)[i]);
        (*n)++;
    }
    const Json *t = doc.type == JSON_OBJECT ? json_get(&doc, "tools") : NULL;
    if (!err && t && t->type != JSON_NULL) {
        if (!tools) err = chat_fail("it holds \"tools\" too, and tools were given with --tools");
        else err = chat_tools(t, tools, n_tools);
    }
    json_free(&doc);
    return err;
}

/* Tools: a JSON list of tools or an object with "tools"; *tools gets each one's tojson text */
const char *chat_parse_tools(const char *text, size_t len, char ***tools, int *n_tools) {
    JsonParser p;
    Json doc;
    *tools = NULL, *n_tools = 0;
    if (!json_parse(&p, text, len, &doc)) return chat_fail("%s", p.error);
    const Json *list = doc.type == JSON_OBJECT ? json_get(&doc, "tools") : &doc;
    const char *err = list ? chat_tools(list, tools, n_tools) : chat_fail("expected a list of tools, or an object with \"tools\"");
    json_free(&doc);
    return err;
}

/* ============================================================================================
 * Rendering: the checkpoint's chat template, written out for each kind
 * ============================================================================================ */

static const char *text_of(const ChatMessage *m) { return m->content ? m->content : ""; }

/* whether the template (enum mm_chat_template) renders tools, tool calls and tool messages */
bool chat_has_tools(int template) {
    return template == MM_CHAT_MINIMIND2 || template == MM_CHAT_MINIMIND3;
}

/* NULL when the template renders this conversation as its Jinja does, else why it cannot */
const char *chat_check(int template, const ChatMessage *msgs, int n, int n_tools) {
    if (n > 0 && !strcmp(msgs[0].role, "system") && !msgs[0].content)  /* (every template fails on it) */
        return chat_fail("message 1: a system message with no content");
    for (int i = 0; i < n; i++) {
        if (chat_has_tools(template)) break;
        if (msgs[i].n_tool_calls || !strcmp(msgs[i].role, "tool"))
            return chat_fail("message %d: %s, which this model's chat template has no place for", i + 1,
                             msgs[i].n_tool_calls ? "tool calls" : "a tool's result");
        if (!msgs[i].content)  /* (the MiniMind templates print ""; the others fail on null) */
            return chat_fail("message %d has no content, which this model's chat template needs", i + 1);
    }
    if (n_tools && !chat_has_tools(template)) return chat_fail("this model's chat template lists no tools");
    return NULL;
}

/* the system block that lists the tools (both MiniMind templates): the system prompt first */
static void render_tools(Str *b, const char *system, char *const *tools, int n_tools) {
    str_cat(b, "<|im_start|>system\n");
    if (system) {
        str_cat(b, system);
        str_cat(b, "\n\n");
    }
    str_cat(b, "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>");
    for (int i = 0; i < n_tools; i++) {
        str_cat(b, "\n");
        str_cat(b, tools[i]);
    }
    str_cat(b, "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
               "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
}

/* an assistant turn's tool calls, after its text (content: whether that text is non-empty) */
static void render_tool_calls(Str *b, const ChatMessage *m, bool content) {
    for (int i = 0; i < m->n_tool_calls; i++) {
        if (i > 0 || content) str_cat(b, "\n");
        str_cat(b, "<tool_call>\n{\"name\": \"");
        str_cat(b, m->tool_calls[i].name);
        str_cat(b, "\", \"arguments\": ");
        str_cat(b, m->tool_calls[i].arguments);
        str_cat(b, "}\n</tool_call>");
    }
}

/* minimind-3 renders an assistant turn as <think>\n{reasoning}\n</think>\n\n{answer}: the
 * reasoning is reasoning_content when given, else taken out of content that holds a </think> */
static void render_minimind3_assistant(Str *b, const ChatMessage *m) {
    const char *content = text_of(m), *end = content + strlen(content);
    const char *r_s = "", *r_e = r_s, *a_s = content, *a_e = end;
    if (m->reasoning) {
        r_s = m->reasoning;
        r_e = r_s + strlen(r_s);
    } else if (strstr(content, "</think>")) {
        /* reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') */
        r_s = content;
        r_e = strstr(content, "</think>");
        strip_newlines(&r_s, &r_e, false, true);
        const char *open = find_last(r_s, r_e, "<think>");
        if (open) r_s = open + strlen("<think>");
        strip_newlines(&r_s, &r_e, true, false);
        /* content = content.split('</think>')[-1].lstrip('\n') */
        a_s = find_last(content, end, "</think>") + strlen("</think>");
        strip_newlines(&a_s, &a_e, true, false);
    }
    bool has_content = a_e > a_s;               /* (the test the template's tool calls make) */
    strip_newlines(&r_s, &r_e, true, true);     /* reasoning_content.strip('\n') */
    strip_newlines(&a_s, &a_e, true, false);    /* content.lstrip('\n') */
    str_cat(b, "<|im_start|>assistant\n<think>\n");
    str_add(b, r_s, (size_t)(r_e - r_s));
    str_cat(b, "\n</think>\n\n");
    str_add(b, a_s, (size_t)(a_e - a_s));
    render_tool_calls(b, m, has_content);
    str_cat(b, "<|im_end|>\n");
}

/* The prompt text for a conversation, as the template names it (enum mm_chat_template), with the
 * tools (each its JSON text) listed in the system block when there are any. add_generation_prompt
 * opens the assistant's turn; think opens minimind-3's thinking block. Tools, tool calls and tool
 * messages need a MiniMind template (the caller checks). Returns a malloc'd string (NULL when out
 * of memory). */
char *chat_render(int template, const ChatMessage *msgs, int n, char *const *tools, int n_tools,
                  bool add_generation_prompt, bool think) {
    Str b = {0};
    str_cat(&b, "");
    bool first_is_system = n > 0 && strcmp(msgs[0].role, "system") == 0;
    if (n_tools > 0) {
        render_tools(&b, first_is_system ? text_of(&msgs[0]) : NULL, tools, n_tools);
    } else if (first_is_system) {
        str_cat(&b, "<|im_start|>system\n");
        str_cat(&b, text_of(&msgs[0]));
        str_cat(&b, "<|im_end|>\n");
    } else if (template == MM_CHAT_MINIMIND2 || template == MM_CHAT_MINIMIND2_NO_TOOLS) {
        str_cat(&b, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n");
    }
    for (int i = first_is_system ? 1 : 0; i < n; i++) {
        const ChatMessage *m = &msgs[i];
        if (!strcmp(m->role, "tool")) {  /* consecutive tool results share one user turn */
            if (i == 0 || strcmp(msgs[i - 1].role, "tool")) str_cat(&b, "<|im_start|>user");
            str_cat(&b, "\n<tool_response>\n");
            str_cat(&b, text_of(m));
            str_cat(&b, "\n</tool_response>");
            if (i == n - 1 || strcmp(msgs[i + 1].role, "tool")) str_cat(&b, "<|im_end|>\n");
        } else if (!strcmp(m->role, "assistant") && template == MM_CHAT_MINIMIND3) {
            render_minimind3_assistant(&b, m);
        } else {
            str_cat(&b, "<|im_start|>");
            str_cat(&b, m->role);
            str_cat(&b, "\n");
            str_cat(&b, text_of(m));
            render_tool_calls(&b, m, text_of(m)[0] != 0);
            str_cat(&b, "<|im_end|>\n");
        }
    }
    if (add_generation_prompt) {
        str_cat(&b, "<|im_start|>assistant\n");
        if (template == MM_CHAT_MINIMIND3) str_cat(&b, think ? "<think>\n" : "<think>\n\n</think>\n\n");
    }
    if (b.oom) { free(b.s); return NULL; }
    return b.s;
}
