mod common;

use common::tok;

#[test]
fn worked_examples_model_spec() {
    let Some(t) = tok() else { return };
    let cases: &[(&str, &[u32])] = &[
        ("Hello", &[19923]),
        ("Hello world", &[19923, 2058]),
        (
            "    int x = 12345;\n",
            &[361, 688, 1527, 438, 223, 6895, 1883, 510],
        ),
        ("a\n  \n  b", &[67, 67130, 223, 291]),
        ("Perché è così", &[8032, 29897, 7269, 49299]),
        (
            "<｜DSML｜invoke name=\"f\">",
            &[30, 128825, 40148, 5406, 2329, 1281, 72, 3320],
        ),
        (
            "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>",
            &[0, 128803, 19923, 128804, 128822],
        ),
        (
            "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜><think>",
            &[0, 128803, 19923, 128804, 128821],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(t.encode(text).unwrap(), *want, "{text:?}");
        assert_eq!(t.decode(want), text.as_bytes());
    }
}

#[test]
fn specials_by_string() {
    let Some(t) = tok() else { return };
    let s = t.specials();
    assert_eq!(s.as_array(), [0, 1, 128803, 128804, 128821, 128822, 128825]);
    assert_eq!(t.vocab_size(), 129280);
}
