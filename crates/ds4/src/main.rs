fn main() { println!("ds4"); }
