use super::*;

fn frames(input: &[u8]) -> Vec<usize> {
    let mut sc = ReplyScanner::new();
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some(f) = sc.scan(&input[pos..]).unwrap() {
        out.push(f.len);
        pos += f.len;
    }
    out
}

#[test]
fn resp2_types() {
    assert_eq!(
        frames(b"+OK\r\n-ERR x\r\n:5\r\n$3\r\nfoo\r\n$-1\r\n*-1\r\n"),
        vec![5, 8, 4, 9, 5, 5]
    );
    let nested = b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n";
    assert_eq!(frames(nested), vec![nested.len()]);
}

#[test]
fn resp3_types() {
    let map = b"%2\r\n+a\r\n:1\r\n+b\r\n_\r\n";
    assert_eq!(frames(map), vec![map.len()]);
    let attr = b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n";
    assert_eq!(
        frames(attr),
        vec![attr.len()],
        "an attribute belongs to the next frame"
    );
    let nested_attr = b"*2\r\n|1\r\n+a\r\n:1\r\n:2\r\n:3\r\n";
    assert_eq!(frames(nested_attr), vec![nested_attr.len()]);
    let misc = b",1.5\r\n#t\r\n(123\r\n=7\r\ntxt:abc\r\n!3\r\nerr\r\n~1\r\n:1\r\n";
    assert_eq!(frames(misc).len(), 6);
    let streamed = b"$?\r\n;2\r\nab\r\n;0\r\n*?\r\n:1\r\n.\r\n";
    assert_eq!(frames(streamed), vec![16, 11]);
}

#[test]
fn push_frames_are_marked() {
    let mut sc = ReplyScanner::new();
    let f = sc.scan(b">2\r\n+message\r\n+x\r\n").unwrap().unwrap();
    assert!(f.push);
    let f = sc.scan(b"*1\r\n>1\r\n:1\r\n").unwrap().unwrap();
    assert!(!f.push);
}

#[test]
fn resumes_across_reads() {
    let whole = b"*3\r\n$5\r\nhello\r\n:42\r\n*2\r\n+a\r\n+b\r\n";
    for cut in 0..whole.len() {
        let mut sc = ReplyScanner::new();
        let first = sc.scan(&whole[..cut]).unwrap();
        assert!(first.is_none(), "cut {cut}");
        assert_eq!(
            sc.scan(whole).unwrap().unwrap().len,
            whole.len(),
            "cut {cut}"
        );
    }
}

#[test]
fn depth_is_capped() {
    let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
    assert_eq!(ReplyScanner::new().scan(&deep), Err(ScanError::TooDeep));
}

#[test]
fn garbage_is_invalid() {
    assert_eq!(
        ReplyScanner::new().scan(b"hello\r\n"),
        Err(ScanError::Invalid)
    );
    assert_eq!(
        ReplyScanner::new().scan(b"$-5\r\n"),
        Err(ScanError::Invalid)
    );
}
